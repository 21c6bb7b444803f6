"""The user's own corpus (plain text files) as a TFDS dataset `text_files`.

`files` is a directory or a comma-separated list of files, one sentence or document per
line, UTF-8:
  * monolingual: `.txt` files, feature `text`;
  * parallel: line-aligned files that differ by suffix (`train.en` + `train.es`), one
    feature per suffix (`en`, `es`).
The file name's stem gives the split: `train*`, `valid*`/`validation*`/`dev*`, `test*`; any
other name counts as training data. A split without a file of its own is held out of the
training lines: line i goes to validation when i % 20 == 18 and to test when i % 20 == 19
(5% each, deterministic, spread over the whole corpus).

Each corpus is built under `<data_dir>/text_files/<hash>/`, the hash of the files' paths,
sizes and modification times, so different corpora (or an edited one) never collide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib

import tensorflow_datasets as tfds

SPLITS = ('train', 'validation', 'test')
_HOLDOUT_PERIOD = 20
_HOLDOUT_INDEX = {'validation': 18, 'test': 19}
_MONOLINGUAL_SUFFIXES = ('txt', '')


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The files of a corpus: features (one per suffix) and, per split, one file per feature."""
  features: tuple[str, ...]
  # split -> list of {feature: file} groups, in name order; 'train' also holds unnamed files.
  groups: dict[str, list[dict[str, pathlib.Path]]]

  @property
  def digest(self) -> str:
    """A short hash of the paths, sizes and modification times of the files."""
    h = hashlib.sha256()
    for split in SPLITS:
      for group in self.groups.get(split, []):
        for feature, path in sorted(group.items()):
          st = path.stat()
          h.update(f'{split}\0{feature}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n'
                   .encode())
    return h.hexdigest()[:16]


def _split_of(stem: str) -> str:
  stem = stem.lower()
  if stem.startswith(('valid', 'dev')):
    return 'validation'
  if stem.startswith('test'):
    return 'test'
  return 'train'


def _list_files(files: str) -> list[pathlib.Path]:
  paths = [pathlib.Path(p.strip()).expanduser() for p in files.split(',') if p.strip()]
  if len(paths) == 1 and paths[0].is_dir():
    paths = sorted(p for p in paths[0].iterdir() if p.is_file() and not p.name.startswith('.'))
    if not paths:
      raise ValueError(f'{files}: the directory holds no files')
  for p in paths:
    if not p.is_file():
      raise FileNotFoundError(f'{p}: no such file')
  return paths


def discover(files: str) -> Corpus:
  """Groups the files of `files` (a directory or comma-separated paths) by split and suffix."""
  paths = _list_files(files)
  suffixes = {p.suffix.lstrip('.') for p in paths}
  if suffixes <= set(_MONOLINGUAL_SUFFIXES):
    groups: dict[str, list] = {}
    for p in paths:
      groups.setdefault(_split_of(p.stem), []).append({'text': p})
    return Corpus(features=('text',), groups=groups)
  # Parallel: files sharing a stem form one group with one file per suffix.
  features = tuple(sorted(suffixes))
  by_stem: dict[str, dict[str, pathlib.Path]] = {}
  for p in paths:
    by_stem.setdefault(p.stem, {})[p.suffix.lstrip('.')] = p
  groups = {}
  for stem, group in sorted(by_stem.items()):
    missing = [f for f in features if f not in group]
    if missing:
      raise ValueError(f'{", ".join(map(str, group.values()))}: no aligned file with suffix '
                       f'{", ".join("." + m for m in missing)} for stem {stem!r}')
    groups.setdefault(_split_of(stem), []).append(group)
  return Corpus(features=features, groups=groups)


# A line is one sentence or document. Past this many bytes it is almost surely not (a file
# without newlines, a serialized blob): better a clear error than a tokenizer eating memory.
MAX_LINE_BYTES = 1 << 20


def read_lines(path: pathlib.Path) -> list[str]:
  """The lines of a UTF-8 text file (whitespace-stripped), with errors naming file and line."""
  data = path.read_bytes()
  if not data.strip():
    raise ValueError(f'{path}: the file is empty')
  lines = data.split(b'\n')
  if lines[-1] == b'':
    lines.pop()  # the final newline ends the last line rather than starting one
  result = []
  for number, raw in enumerate(lines, start=1):
    if len(raw) > MAX_LINE_BYTES:
      raise ValueError(f'{path}: line {number} is {len(raw):,} bytes long, over the '
                       f'{MAX_LINE_BYTES:,} a line may hold; put one sentence or document '
                       'per line')
    if b'\0' in raw:
      raise ValueError(f'{path}: line {number} holds a NUL byte; this looks like a binary '
                       'file, not UTF-8 text')
    try:
      result.append(raw.decode('utf-8').strip())
    except UnicodeDecodeError as e:
      raise ValueError(f'{path}: line {number} is not valid UTF-8 (byte {e.start}: '
                       f'{raw[e.start:e.start + 1]!r})') from e
  return result


def _read_group(group: dict[str, pathlib.Path]) -> list[dict[str, str]]:
  """The records of one aligned group of files; lines with an empty side are skipped."""
  columns = {feature: read_lines(path) for feature, path in group.items()}
  counts = {feature: len(lines) for feature, lines in columns.items()}
  if len(set(counts.values())) > 1:
    described = ' but '.join(f'{group[f]} has {n} lines' for f, n in counts.items())
    raise ValueError(f'parallel files are not line-aligned: {described}')
  records = [dict(zip(columns, values)) for values in zip(*columns.values())]
  return [r for r in records if all(r.values())]


def split_records(corpus: Corpus) -> dict[str, list[dict[str, str]]]:
  """{split: records}, holding out validation/test lines when they have no files."""
  result = {split: [r for group in corpus.groups.get(split, []) for r in _read_group(group)]
            for split in SPLITS}
  held_out = [s for s in ('validation', 'test') if not corpus.groups.get(s)]
  if held_out:
    keep = []
    for i, record in enumerate(result['train']):
      target = next((s for s in held_out if i % _HOLDOUT_PERIOD == _HOLDOUT_INDEX[s]), None)
      (result[target] if target else keep).append(record)
    # A corpus of fewer than 20 lines still gets one held-out line per split (from the end).
    for split in held_out:
      if not result[split] and len(keep) > 1:
        result[split].append(keep.pop())
    result['train'] = keep
  if not result['train']:
    raise ValueError(f'no training lines in {", ".join(corpus_files(corpus))}')
  return result


def corpus_files(corpus: Corpus) -> list[str]:
  return [str(p) for groups in corpus.groups.values() for g in groups for p in g.values()]


class TextFilesConfig(tfds.core.BuilderConfig):
  """A builder config for one corpus: its files string and features."""

  def __init__(self, *, files: str, corpus: Corpus):
    super().__init__(name=f'h{corpus.digest}', version='1.0.0',
                     description=f'text files: {files}')
    self.files = files
    self.corpus = corpus


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """The user's text files; build with `builder(files, data_dir)`, not by name."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {f: tfds.features.Text() for f in self.builder_config.corpus.features}
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    records = split_records(self.builder_config.corpus)
    # TFDS cannot write an empty split; a split left out is reported when it is read.
    return {s: iter(list(enumerate(records[s]))) for s in SPLITS if records[s]}

  def _generate_examples(self, **kwargs):  # required by the base class; unused
    raise NotImplementedError


def builder(files: str, data_dir: str | os.PathLike) -> TextFiles:
  """The TFDS builder of a corpus (not yet prepared)."""
  config = TextFilesConfig(files=files, corpus=discover(files))
  return TextFiles(config=config, data_dir=os.fspath(data_dir))


def prepare(files: str, data_dir: str | os.PathLike) -> dict[str, int]:
  """Builds the corpus's dataset if missing; returns {split: examples}."""
  b = builder(files, data_dir)
  b.download_and_prepare()
  return {name: info.num_examples for name, info in b.info.splits.items()}


def data_source(files: str, data_dir: str | os.PathLike, split: str):
  """A random-access source of one split of the corpus, built on first use."""
  b = builder(files, data_dir)
  b.download_and_prepare()
  return b.as_data_source(split=split)


def slug(files: str) -> str:
  """A name for caches derived from the corpus (e.g. its tokenizers)."""
  return f'files_{discover(files).digest}'
