"""SentencePiece tokenizers: fixed special ids, round trips, the on-disk cache."""

import pickle

import pytest

from data import tokenizer as tokenizer_lib

CORPUS = [
    'In the beginning God created the heaven and the earth.',
    'And the earth was without form, and void; and darkness was upon the face of the deep.',
    'And God said, Let there be light: and there was light.',
    'Y dijo Dios: Sea la luz: y fué la luz.',
] * 20


@pytest.fixture(scope='module', params=['bpe', 'unigram'])
def tok(request, tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / f'toy_{request.param}_200.model'
  return tokenizer_lib.get_or_train(path, lambda: CORPUS, model_type=request.param,
                                    vocab_size=200)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert (tok.mask_id, tok.sep_id, tok.cls_id) == (4, 5, 6)
  assert [tok.id_to_piece(i) for i in range(7)] == [
      '<pad>', '<unk>', '<s>', '</s>', '[MASK]', '[SEP]', '[CLS]']
  assert tok.encode('[MASK]') [-1] == 4  # user symbols are atomic pieces
  assert 7 < tok.vocab_size <= 200


def test_round_trip(tok):
  for text in ('In the beginning God created the heaven and the earth.',
               'Sea la luz, y fué la luz.', 'the deep void'):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids) and tokenizer_lib.EOS_ID not in ids
    assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_skips_pad_and_bos(tok):
  ids = tok.encode('And God said')
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, *tok.encode('light'), 0, 0]) == 'And God said'
  assert tok.decode([0, 0, *ids, 0]) == 'And God said'


def test_pickles(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode('void and darkness') == tok.encode('void and darkness')


def test_cached_model_is_reused_not_retrained(tmp_path):
  path = tmp_path / 'sub' / 'toy_bpe_120.model'
  calls = []

  def texts():
    calls.append(1)
    return CORPUS

  first = tokenizer_lib.get_or_train(path, texts, model_type='bpe', vocab_size=120)
  mtime = path.stat().st_mtime_ns
  second = tokenizer_lib.get_or_train(path, texts, model_type='bpe', vocab_size=120)
  assert calls == [1] and path.stat().st_mtime_ns == mtime
  assert second.encode('the earth') == first.encode('the earth')
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over


def test_unknown_model_type():
  with pytest.raises(ValueError, match="'word' is not one of"):
    tokenizer_lib.train(CORPUS, model_type='word', vocab_size=100)


def test_long_lines_are_cut_for_training():
  pieces = list(tokenizer_lib._pieces(['word ' * 1000, 'a\nb']))
  assert all(len(p) <= tokenizer_lib._PIECE_CHARS for p in pieces)
  assert ' '.join(pieces[:-2]).split() == ['word'] * 1000 and pieces[-2:] == ['a', 'b']
