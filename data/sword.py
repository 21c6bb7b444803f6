"""A reader of SWORD zText Bible modules and the fetcher of Debian's packaged modules.

A zText module stores each testament in three files:
  <t>.bzs  blocks: (uint32 offset into .bzz, uint32 compressed size, uint32 plain size)
  <t>.bzv  entries: (uint32 block index, uint32 offset in the plain block, uint16 size)
  <t>.bzz  the zlib-compressed blocks, one per book for BlockType=BOOK
all little-endian. The entries carry no keys: their order is fixed by the versification,
[0] module header, [1] testament header, then per book one intro entry and per chapter one
intro entry followed by one entry per verse. The verse counts come from versification.json.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import html
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator

PACKAGES = ('sword-text-kjv', 'sword-text-web', 'sword-text-sparv')
# The module each translation comes from (the name of its directory and .conf file).
MODULES = {'kjv': 'engKJV2006eb', 'web': 'engWEB2015eb', 'rv1909': 'spaRV1909eb'}
TESTAMENTS = ('ot', 'nt')

_BLOCK = struct.Struct('<III')
_ENTRY = struct.Struct('<IIH')


@dataclasses.dataclass(frozen=True)
class Verse:
  """One verse of plain text, addressed by its OSIS book name, chapter and verse."""
  book: str
  chapter: int
  verse: int
  text: str


@functools.cache
def versification_table() -> dict[str, dict[str, list[tuple[str, list[int]]]]]:
  """{'kjv'|'nrsva': {'ot'|'nt': [(osis book, [verses per chapter])]}} from the json."""
  path = pathlib.Path(__file__).with_name('versification.json')
  raw = json.loads(path.read_text())
  return {v11n: {t: [(book, list(counts)) for book, counts in books]
                 for t, books in testaments.items()}
          for v11n, testaments in raw.items()}


def expected_entries(books: list[tuple[str, list[int]]]) -> int:
  """Number of .bzv entries of a testament: 2 headers, book and chapter intros, verses."""
  return 2 + sum(1 + sum(1 + n for n in chapters) for _, chapters in books)


# ---------------------------------------------------------------------------------------
# Markup.

# Elements whose whole content is dropped: notes (footnotes, cross references), headings
# (titles, speaker labels in the Song of Songs), which are not part of the verse text.
_DROPPED = re.compile(r'<(note|title|speaker)\b[^>]*?(?<!/)>.*?</\1\s*>', re.DOTALL)
# Tags that separate words (poetry lines, paragraphs, milestones) become a space; the rest
# (<w>, <transChange>, <divineName>, <q>, ...) wrap words and vanish without a trace.
_SPACING_TAGS = re.compile(
    r'</?(div|p|l|lg|lb|list|item|chapter|verse|milestone|br|table|row|cell)\b[^>]*>')
_ANY_TAG = re.compile(r'<[^>]*>')
# A dropped note between a word and the punctuation after it leaves a stray space.
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.;:!?’”)\]])')


def strip_markup(osis: str) -> str:
  """Plain text of an OSIS verse entry: tags and notes gone, whitespace normalised."""
  text = _DROPPED.sub(' ', osis)
  text = _SPACING_TAGS.sub(' ', text)
  text = _ANY_TAG.sub('', text)
  text = html.unescape(text).replace('¶', ' ')
  text = ' '.join(text.split())
  return _SPACE_BEFORE_PUNCT.sub(r'\1', text)


# ---------------------------------------------------------------------------------------
# zText.

def read_conf(conf_path: str | os.PathLike) -> dict[str, str]:
  """The settings of a module's .conf file (keys as written, e.g. 'Versification')."""
  parser = configparser.ConfigParser(interpolation=None, strict=False)
  parser.optionxform = str  # keep the case of the keys
  text = pathlib.Path(conf_path).read_text(encoding='utf-8', errors='replace')
  parser.read_string(text)
  section = parser.sections()[0]
  return dict(parser[section])


def read_testament(module_dir: str | os.PathLike, testament: str,
                   books: list[tuple[str, list[int]]]) -> Iterator[Verse]:
  """Yields the non-empty verses of one testament of a zText module."""
  base = pathlib.Path(module_dir) / testament
  bzs = base.with_suffix('.bzs').read_bytes()
  bzv = base.with_suffix('.bzv').read_bytes()
  bzz = base.with_suffix('.bzz').read_bytes()
  bzv_path = base.with_suffix('.bzv')
  if len(bzv) % _ENTRY.size or len(bzs) % _BLOCK.size:
    raise ValueError(f'{bzv_path}: truncated index ({len(bzv)} bytes in .bzv, '
                     f'{len(bzs)} in .bzs)')
  entries = list(_ENTRY.iter_unpack(bzv))
  expected = expected_entries(books)
  if len(entries) != expected:
    raise ValueError(f'{bzv_path}: {len(entries)} entries, but the versification table '
                     f'expects {expected}; wrong Versification in the .conf or a damaged file')
  blocks = list(_BLOCK.iter_unpack(bzs))

  @functools.lru_cache(maxsize=2)  # BlockType=BOOK: entries come block by block
  def block(index: int) -> bytes:
    offset, size, plain_size = blocks[index]
    data = zlib.decompress(bzz[offset:offset + size])
    if len(data) != plain_size:
      raise ValueError(f'{base}.bzz: block {index} is {len(data)} bytes, not {plain_size}')
    return data

  def entry_text(i: int) -> str:
    index, offset, size = entries[i]
    if size == 0:
      return ''
    return block(index)[offset:offset + size].decode('utf-8', errors='replace')

  i = 2  # past the module and testament headers
  for book, chapters in books:
    i += 1  # book intro
    for chapter, num_verses in enumerate(chapters, start=1):
      i += 1  # chapter intro
      for verse in range(1, num_verses + 1):
        text = strip_markup(entry_text(i))
        i += 1
        if text:
          yield Verse(book, chapter, verse, text)


def read_module(module_dir: str | os.PathLike, v11n: str) -> Iterator[Verse]:
  """Yields all verses of a module in canonical order; `v11n` is e.g. 'kjv' or 'nrsva'."""
  table = versification_table()
  if v11n not in table:
    raise ValueError(f'versification {v11n!r} not in versification.json ({sorted(table)})')
  for testament in TESTAMENTS:
    if (pathlib.Path(module_dir) / f'{testament}.bzv').exists():
      yield from read_testament(module_dir, testament, table[v11n][testament])


def module_paths(root: str | os.PathLike, module: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(module data directory, .conf file) inside an extracted package root."""
  sword = pathlib.Path(root) / 'usr/share/sword'
  return sword / 'modules/texts/ztext' / module, sword / 'mods.d' / f'{module}.conf'


def read_translation(root: str | os.PathLike, translation: str) -> Iterator[Verse]:
  """Yields the verses of 'kjv', 'web' or 'rv1909' from an extracted package root."""
  module_dir, conf_path = module_paths(root, MODULES[translation])
  conf = read_conf(conf_path)
  if conf.get('CompressType', 'ZIP').upper() != 'ZIP':
    raise ValueError(f'{conf_path}: CompressType={conf["CompressType"]} is not supported')
  return read_module(module_dir, conf.get('Versification', 'KJV').lower())


# ---------------------------------------------------------------------------------------
# Fetching the Debian packages.

def is_fetched(root: str | os.PathLike) -> bool:
  """Whether every module's files are extracted under `root`."""
  for module in MODULES.values():
    module_dir, conf = module_paths(root, module)
    if not conf.exists() or not (module_dir / 'nt.bzz').exists():
      return False
  return True


def _download(debs: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(['apt-get', 'download', *PACKAGES], cwd=debs,
                        capture_output=True, text=True, check=False)


def fetch(data_dir: str | os.PathLike) -> pathlib.Path:
  """Downloads and extracts the SWORD packages; returns `<data_dir>/sword/root`.

  `apt-get download` + `dpkg -x` need no root as long as the apt lists exist; on a bare
  machine where we are root (CI) we run `apt-get update` first. Skips work already done.
  """
  sword = pathlib.Path(data_dir) / 'sword'
  root, debs = sword / 'root', sword / 'debs'
  if is_fetched(root):
    return root
  if shutil.which('apt-get') is None or shutil.which('dpkg') is None:
    raise RuntimeError('fetching the SWORD Bibles needs apt-get and dpkg (a Debian/Ubuntu '
                       f'machine); or extract {", ".join(PACKAGES)} into {root} by hand')
  debs.mkdir(parents=True, exist_ok=True)
  have = lambda: sorted(debs.glob('*.deb'))
  if len(have()) < len(PACKAGES):
    result = _download(debs)
    if result.returncode != 0 and os.geteuid() == 0:
      subprocess.run(['apt-get', 'update'], capture_output=True, text=True, check=False)
      result = _download(debs)
    if result.returncode != 0:
      raise RuntimeError(
          f'apt-get download {" ".join(PACKAGES)} failed:\n{result.stderr.strip()}\n'
          f'Run as root:  apt-get update\nthen:  cd {debs} && apt-get download '
          f'{" ".join(PACKAGES)}\nand again:  python -m data.prepare --data_dir={data_dir}')
  # Extract into a fresh directory and rename, so a crash never leaves half a root.
  tmp = sword / 'root.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  for deb in have():
    subprocess.run(['dpkg', '-x', str(deb), str(tmp)], check=True, capture_output=True)
  shutil.rmtree(root, ignore_errors=True)
  tmp.rename(root)
  if not is_fetched(root):
    raise RuntimeError(f'{debs} does not hold all of {", ".join(PACKAGES)}; delete it and '
                       'run again')
  return root
