"""SentencePiece tokenizers (BPE or unigram) trained on a training split and cached.

The special ids are fixed across every tokenizer we train, so models and objectives can
name them without looking: pad=0, unk=1, bos=2, eos=3, then the user-defined symbols
[MASK]=4, [SEP]=5, [CLS]=6 (for BERT- and ELECTRA-style objectives).
"""

from __future__ import annotations

import io
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Iterator

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
USER_SYMBOLS = ('[MASK]', '[SEP]', '[CLS]')
MASK_ID, SEP_ID, CLS_ID = 4, 5, 6
MODEL_TYPES = ('bpe', 'unigram')

# SentencePiece reads each input line as one sentence and skips lines longer than
# max_sentence_length, so long documents (Bible chapters) are cut into pieces this long.
_PIECE_CHARS = 2000
# Enough sentences for a good vocabulary while keeping training to seconds on 2 cores.
_INPUT_SENTENCE_SIZE = 30_000


class Tokenizer:
  """A loaded SentencePiece model with the fixed special ids; picklable (holds the bytes)."""

  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
  mask_id, sep_id, cls_id = MASK_ID, SEP_ID, CLS_ID
  special_ids = (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, CLS_ID)

  def __init__(self, model_proto: bytes, path: str = ''):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(),
           *(self._sp.piece_to_id(s) for s in USER_SYMBOLS))
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, CLS_ID):
      raise ValueError(f'{path or "tokenizer"}: special ids {ids} are not the fixed '
                       '(pad, unk, bos, eos, [MASK], [SEP], [CLS]) = (0, ..., 6)')

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    return cls(pathlib.Path(path).read_bytes(), path=os.fspath(path))

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, stopping at the first eos and skipping pad/bos."""
    kept = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i not in (PAD_ID, BOS_ID):
        kept.append(i)
    return self._sp.decode(kept)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def __getstate__(self):
    return {'model_proto': self._proto, 'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['model_proto'], state['path'])

  def __repr__(self) -> str:
    return f'Tokenizer({self.path!r}, vocab_size={self.vocab_size})'


def _pieces(texts: Iterable[str]) -> Iterator[str]:
  """Lines of at most _PIECE_CHARS characters, cut at spaces."""
  for text in texts:
    for line in text.splitlines():
      while len(line) > _PIECE_CHARS:
        cut = line.rfind(' ', 0, _PIECE_CHARS)
        cut = cut if cut > 0 else _PIECE_CHARS
        yield line[:cut]
        line = line[cut:].lstrip()
      if line.strip():
        yield line


def train(texts: Iterable[str], *, model_type: str, vocab_size: int) -> bytes:
  """Trains a SentencePiece model on `texts`; returns the serialized model."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f'tokenizer type {model_type!r} is not one of {MODEL_TYPES}')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_pieces(texts),
      model_writer=model,
      model_type=model_type,
      vocab_size=vocab_size,
      # Small corpora cannot fill a large vocabulary; make vocab_size an upper bound.
      hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(USER_SYMBOLS),
      character_coverage=0.9995,
      input_sentence_size=_INPUT_SENTENCE_SIZE,
      shuffle_input_sentence=True,
      max_sentence_length=_PIECE_CHARS * 4,  # bytes, and a character is up to 4 of them
      num_threads=2,
      minloglevel=2,
  )
  return model.getvalue()


def write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` through a private temporary file and a rename."""
  # Concurrent workers (pytest -n 2, several hosts) may train the same tokenizer; each
  # writes a private file and renames it, so a reader never sees half a model.
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def get_or_train(path: str | os.PathLike, texts: Callable[[], Iterable[str]], *,
                 model_type: str, vocab_size: int) -> Tokenizer:
  """Loads the model at `path`, training it on `texts()` first if it does not exist."""
  path = pathlib.Path(path)
  if not path.exists():
    write_atomically(path, train(texts(), model_type=model_type, vocab_size=vocab_size))
  return Tokenizer.load(path)
