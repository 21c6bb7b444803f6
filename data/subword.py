"""Subword tokenizers for the encoder families, through Hugging Face `tokenizers`.

Two kinds, chosen by name (sentencepiece in data/tokenizer.py stays for GPT):
  'wordpiece'  BERT: [PAD] [UNK] [CLS] [SEP] [MASK], BERT's normalizer and pre-tokenizer;
               bos/eos are [CLS]/[SEP]. Trained ones number them 0..4 in that order.
  'byte_bpe'   RoBERTa / GPT-2 byte-level BPE: <s> <pad> </s> <unk> <mask>, numbered 0..3 like
               RoBERTa when trained (so it pads with id 1: never find padding by `ids > 0`).

A SubwordTokenizer offers the names the sentencepiece Tokenizer offers (vocab_size, encode,
decode, id_to_piece, pad_id, ..., path), so the pipeline takes either:

  tok = subword.train('wordpiece', texts, vocab_size=8000)           # seconds
  tok = subword.from_pretrained_dir('.../model')                      # a published BERT
  tok = subword.load_or_train(kind, cache_path, texts_fn, vocab_size)  # what pipelines call
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Kind:
  """The special tokens of one kind; `trained_order` is their ids 0, 1, ... when trained."""
  name: str
  pad: str
  unk: str
  cls: str
  sep: str
  mask: str
  bos: str
  eos: str
  trained_order: tuple[str, ...]
  lowercase: bool  # the default: uncased BERT, cased RoBERTa

  @property
  def tokens(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys((self.pad, self.unk, self.cls, self.sep, self.mask,
                                self.bos, self.eos)))


KINDS: dict[str, Kind] = {
    'wordpiece': Kind('wordpiece', pad='[PAD]', unk='[UNK]', cls='[CLS]', sep='[SEP]',
                      mask='[MASK]', bos='[CLS]', eos='[SEP]',
                      trained_order=('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'),
                      lowercase=True),
    'byte_bpe': Kind('byte_bpe', pad='<pad>', unk='<unk>', cls='<s>', sep='</s>',
                     mask='<mask>', bos='<s>', eos='</s>',
                     trained_order=('<s>', '<pad>', '</s>', '<unk>', '<mask>'),
                     lowercase=False),
}

# GPT-2's byte-to-character map sends the bytes 0..32 to chr(256 + byte); these are the
# whitespace bytes among them (tab, newline, vertical tab, form feed, return, space='Ġ').
_BYTE_SPACES = frozenset(chr(256 + b) for b in (9, 10, 11, 12, 13, 32))
_BYTE_BPE_MIN_VOCAB = 256 + 5  # every byte and the specials
_MAX_WORDPIECE_CHARS = 100  # BERT's: longer words become [UNK]


def _kind(name: str) -> Kind:
  if name not in KINDS:
    raise ValueError(f'subword tokenizer kind {name!r} is not one of {tuple(KINDS)}')
  return KINDS[name]


def _kind_of(tok: tokenizers.Tokenizer, where: str) -> Kind:
  """Which kind a loaded tokenizer is, from its model and pre-tokenizer."""
  model = type(tok.model).__name__
  if model == 'WordPiece':
    return KINDS['wordpiece']
  if model == 'BPE' and 'ByteLevel' in json.dumps(json.loads(tok.to_str())['pre_tokenizer']):
    return KINDS['byte_bpe']
  raise ValueError(f'{where}: a {model} tokenizer is neither WordPiece nor byte-level BPE')


class SubwordTokenizer:
  """A `tokenizers.Tokenizer` of one kind with its special ids; picklable (holds the JSON)."""

  def __init__(self, tokenizer_json: str, path: str = ''):
    self.path = path
    where = path or 'tokenizer'
    try:
      tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the Rust side raises a bare Exception
      raise ValueError(f'{where}: not a valid tokenizer.json: {e}') from e
    # Published tokenizer.json files may pad or truncate every encoding (MiniLM's pads to
    # 128); our pipelines pack and cut documents themselves.
    tok.no_padding()
    tok.no_truncation()
    self.kind = _kind_of(tok, where)
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [t for t in self.kind.tokens if t not in vocab]
    if missing:
      raise ValueError(f'{where}: special tokens {missing} of a {self.kind.name} tokenizer '
                       'are not in its vocabulary')
    # Specials must be atomic (never split, skipped by decode) even if a file only lists them
    # in the vocabulary. RoBERTa's <mask> absorbs the space before it.
    tok.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False,
                              lstrip=(t == '<mask>')) for t in self.kind.tokens])
    self._tok = tok
    self._json = tok.to_str()
    k = self.kind
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id, \
        self.eos_id = (vocab[t] for t in (k.pad, k.unk, k.cls, k.sep, k.mask, k.bos, k.eos))
    self.special_ids: tuple[int, ...] = tuple(sorted({vocab[t] for t in k.tokens}))
    self._tables(vocab)

  def _tables(self, vocab: Mapping[str, int]) -> None:
    """Per-id lookups behind word_starts: special, starts with a space, ends with one."""
    n = max(vocab.values()) + 1
    self._special = np.zeros(n, bool)
    self._special[list(self.special_ids)] = True
    self._opens = np.zeros(n, bool)   # the piece itself begins a word
    self._closes = np.zeros(n, bool)  # the piece after it begins a word
    for piece, i in vocab.items():
      if self.kind.name == 'wordpiece':
        self._opens[i] = not piece.startswith('##')
      else:
        self._opens[i] = piece[:1] in _BYTE_SPACES
        self._closes[i] = piece[-1:] in _BYTE_SPACES
    self._opens |= self._special
    self._closes |= self._special

  # ------------------------------------------------------------------------------------
  # The sentencepiece Tokenizer's names.

  @classmethod
  def load(cls, path: str | os.PathLike) -> SubwordTokenizer:
    """Reads a tokenizer.json (a file, or a directory holding one)."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / 'tokenizer.json'
    return cls(_read_text(path), path=os.fspath(path))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """encode of each text, in parallel threads."""
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, skipping special tokens."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def word_starts(self, ids) -> np.ndarray:
    """bool of ids' shape: True where a token begins a word (for whole-word masking).

    Along the last axis a token begins a word if it is the first, is special, follows a
    special, or (WordPiece) is not a '##' continuation / (byte BPE) starts with a space
    byte or follows a piece that ends with one (a newline).
    """
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= len(self._opens)):
      raise ValueError(f'ids outside [0, {len(self._opens)}) of {self!r}')
    starts = self._opens[ids]
    if starts.ndim and starts.shape[-1]:
      starts[..., 0] = True
      starts[..., 1:] |= self._closes[ids[..., :-1]]
    return starts

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes tokenizer.json to `path` (a directory: into it); returns the file."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / 'tokenizer.json'
    tokenizer_lib.write_atomically(path, self._json.encode('utf-8'))
    return path

  def save_pretrained(self, directory: str | os.PathLike) -> list[pathlib.Path]:
    """Writes tokenizer.json plus the published files of its kind (vocab.txt for WordPiece,
    vocab.json + merges.txt for byte BPE) and tokenizer_config.json, as HF ships them."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = [self.save(directory / 'tokenizer.json')]
    files += [pathlib.Path(f) for f in self._tok.model.save(os.fspath(directory))]
    config = {'tokenizer_class': ('BertTokenizer' if self.kind.name == 'wordpiece'
                                  else 'RobertaTokenizer'),
              'do_lower_case': self.lowercase}
    files.append(directory / 'tokenizer_config.json')
    tokenizer_lib.write_atomically(files[-1], json.dumps(config, indent=2).encode('utf-8'))
    return files

  @property
  def lowercase(self) -> bool:
    """Whether the normalizer lowercases (BertNormalizer's flag, or a Lowercase step)."""
    def lowers(n) -> bool:
      if not n:
        return False
      if n['type'] == 'Sequence':
        return any(lowers(m) for m in n['normalizers'])
      return n['type'] == 'Lowercase' or bool(n.get('lowercase'))
    return lowers(json.loads(self._json)['normalizer'])

  def __getstate__(self):
    return {'tokenizer_json': self._json, 'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['tokenizer_json'], state['path'])

  def __repr__(self) -> str:
    return (f'SubwordTokenizer({self.kind.name}, {self.path!r}, '
            f'vocab_size={self.vocab_size})')


# ---------------------------------------------------------------------------------------
# Building and training.

def _pipeline(kind: Kind, model, lowercase: bool, *, strip_accents: bool | None = None,
              chinese_chars: bool = True) -> tokenizers.Tokenizer:
  """A tokenizer of `kind` around `model` with that kind's normalizer, pre-tokenizer and
  decoder (HF's BertTokenizer / RobertaTokenizer set the same ones)."""
  tok = tokenizers.Tokenizer(model)
  if kind.name == 'wordpiece':
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents,
        lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##')
  else:
    if lowercase:
      tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
  return tok


def _with_post_processor(tok: tokenizers.Tokenizer, kind: Kind) -> tokenizers.Tokenizer:
  """[CLS] A [SEP] (B [SEP]) / <s> A </s></s> B </s>, so the saved file encodes like HF's."""
  cls, sep = (kind.cls, tok.token_to_id(kind.cls)), (kind.sep, tok.token_to_id(kind.sep))
  if kind.name == 'wordpiece':
    tok.post_processor = processors.TemplateProcessing(
        single=f'{kind.cls}:0 $A:0 {kind.sep}:0',
        pair=f'{kind.cls}:0 $A:0 {kind.sep}:0 $B:1 {kind.sep}:1', special_tokens=[cls, sep])
  else:
    tok.post_processor = processors.RobertaProcessing(sep, cls, trim_offsets=True,
                                                      add_prefix_space=False)
  return tok


def train(kind: str, texts: Iterable[str], vocab_size: int, *,
          lowercase: bool | None = None) -> SubwordTokenizer:
  """Trains a tokenizer of `kind` on `texts`; at most vocab_size ids, specials first.

  lowercase: None takes the kind's default (WordPiece uncased, byte BPE cased).
  """
  k = _kind(kind)
  lowercase = k.lowercase if lowercase is None else lowercase
  if k.name == 'wordpiece':
    tok = _pipeline(k, models.WordPiece(unk_token=k.unk,
                                        max_input_chars_per_word=_MAX_WORDPIECE_CHARS),
                    lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(k.trained_order),
        continuing_subword_prefix='##', show_progress=False)
  else:
    if vocab_size < _BYTE_BPE_MIN_VOCAB:
      raise ValueError(f'byte_bpe vocab_size {vocab_size} < {_BYTE_BPE_MIN_VOCAB}: it holds '
                       'all 256 bytes and 5 special tokens')
    tok = _pipeline(k, models.BPE(), lowercase)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(k.trained_order),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  if tok.get_vocab_size() > vocab_size:
    # A WordPiece vocabulary holds every character of the corpus (up to the trainer's
    # limit_alphabet); models size their embedding from vocab_size, so do not exceed it.
    raise ValueError(f'{kind}: the corpus alone needs {tok.get_vocab_size()} ids '
                     f'(its alphabet and specials), more than vocab_size={vocab_size}')
  return SubwordTokenizer(_with_post_processor(tok, k).to_str())


# ---------------------------------------------------------------------------------------
# Published files.

def _read_text(path: pathlib.Path) -> str:
  if not path.is_file():
    raise FileNotFoundError(f'{path}: tokenizer file not found')
  try:
    return path.read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e})') from e


def _read_json(path: pathlib.Path):
  try:
    return json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e


def _check_specials(vocab: Mapping[str, int], kind: Kind, path: pathlib.Path) -> None:
  missing = [t for t in kind.tokens if t not in vocab]
  if missing:
    raise ValueError(f'{path}: lacks the special tokens {missing} of a {kind.name} vocabulary')


def from_vocab_txt(path: str | os.PathLike, lowercase: bool = True, *,
                   strip_accents: bool | None = None,
                   chinese_chars: bool = True) -> SubwordTokenizer:
  """A BERT tokenizer from its vocab.txt (one token a line, id = line number).

  strip_accents None follows lowercase, as in BERT (uncased models strip accents).
  """
  path = pathlib.Path(path)
  lines = _read_text(path).split('\n')
  if lines and lines[-1] == '':
    lines.pop()  # the final newline
  vocab = {}
  for i, token in enumerate(lines):
    if not token.strip():
      raise ValueError(f'{path}: line {i + 1} is blank; a vocab.txt has one token a line')
    if vocab.setdefault(token, i) != i:
      raise ValueError(f'{path}: token {token!r} on lines {vocab[token] + 1} and {i + 1}')
  k = KINDS['wordpiece']
  _check_specials(vocab, k, path)
  model = models.WordPiece(vocab, unk_token=k.unk,
                           max_input_chars_per_word=_MAX_WORDPIECE_CHARS)
  tok = _pipeline(k, model, lowercase, strip_accents=strip_accents,
                  chinese_chars=chinese_chars)
  return SubwordTokenizer(_with_post_processor(tok, k).to_str(), path=os.fspath(path))


def from_vocab_and_merges(vocab_json: str | os.PathLike,
                          merges_txt: str | os.PathLike) -> SubwordTokenizer:
  """A RoBERTa / GPT-2 byte-level BPE tokenizer from its vocab.json and merges.txt."""
  vocab_path, merges_path = pathlib.Path(vocab_json), pathlib.Path(merges_txt)
  vocab, merges_text = _read_json(vocab_path), _read_text(merges_path)
  if not isinstance(vocab, dict) or not all(
      isinstance(t, str) and isinstance(i, int) for t, i in vocab.items()):
    raise ValueError(f'{vocab_path}: not a JSON object of token -> integer id')
  k = KINDS['byte_bpe']
  _check_specials(vocab, k, vocab_path)
  merges = []
  for n, line in enumerate(merges_text.split('\n'), start=1):
    if not line or (n == 1 and line.startswith('#version')):
      continue
    pair = tuple(line.split(' '))
    if len(pair) != 2 or not all(pair):
      raise ValueError(f'{merges_path}: line {n} {line!r} is not two tokens and a space')
    unknown = [t for t in (*pair, ''.join(pair)) if t not in vocab]
    if unknown:
      raise ValueError(f'{merges_path}: line {n} {line!r} uses {unknown}, not in {vocab_path}')
    merges.append(pair)
  model = models.BPE(vocab, merges, continuing_subword_prefix='', end_of_word_suffix='',
                     fuse_unk=False)
  tok = _pipeline(k, model, lowercase=False)
  return SubwordTokenizer(_with_post_processor(tok, k).to_str(), path=os.fspath(vocab_path))


def from_pretrained_dir(directory: str | os.PathLike) -> SubwordTokenizer:
  """The tokenizer of a published model directory, by the files it holds.

  tokenizer.json first; else vocab.txt (BERT; do_lower_case and strip_accents from
  tokenizer_config.json, uncased if it is absent); else vocab.json + merges.txt (RoBERTa).
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory}: tokenizer directory not found')
  if (directory / 'tokenizer.json').is_file():
    return SubwordTokenizer.load(directory / 'tokenizer.json')
  config_path = directory / 'tokenizer_config.json'
  config = _read_json(config_path) if config_path.is_file() else {}
  if not isinstance(config, dict):
    raise ValueError(f'{config_path}: not a JSON object')
  if (directory / 'vocab.txt').is_file():
    return from_vocab_txt(directory / 'vocab.txt',
                          lowercase=bool(config.get('do_lower_case', True)),
                          strip_accents=config.get('strip_accents'),
                          chinese_chars=bool(config.get('tokenize_chinese_chars', True)))
  if (directory / 'vocab.json').is_file() or (directory / 'merges.txt').is_file():
    return from_vocab_and_merges(directory / 'vocab.json', directory / 'merges.txt')
  raise FileNotFoundError(f'{directory}: holds none of tokenizer.json, vocab.txt, '
                          'vocab.json + merges.txt')


# ---------------------------------------------------------------------------------------
# The cache.

def get_or_train(path: str | os.PathLike, texts_fn: Callable[[], Iterable[str]], kind: str,
                 vocab_size: int, lowercase: bool | None = None) -> SubwordTokenizer:
  """Loads the tokenizer.json at `path`, training it on `texts_fn()` first if absent."""
  path = pathlib.Path(path)
  if not path.exists():
    train(kind, texts_fn(), vocab_size, lowercase=lowercase).save(path)
  tok = SubwordTokenizer.load(path)
  if tok.kind.name != kind:
    raise ValueError(f'{path}: a cached {tok.kind.name} tokenizer, not {kind}')
  return tok


def load_or_train(kind: str, cache_path: str | os.PathLike,
                  texts_fn: Callable[[], Iterable[str]], vocab_size: int, *,
                  lowercase: bool | None = None,
                  pretrained: str | os.PathLike = '') -> SubwordTokenizer:
  """The published tokenizer in directory `pretrained` if given (it must be of `kind`),
  else get_or_train(cache_path, ...)."""
  _kind(kind)
  if pretrained:
    tok = from_pretrained_dir(pretrained)
    if tok.kind.name != kind:
      raise ValueError(f'{pretrained}: holds a {tok.kind.name} tokenizer, but the config '
                       f'asks for {kind}')
    return tok
  return get_or_train(cache_path, texts_fn, kind, vocab_size, lowercase)
