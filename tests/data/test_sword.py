"""The zText reader: a synthetic module decoded exactly, markup stripping, the real Bibles."""

import struct
import zlib

import pytest

from data import sword

# A small versification: Gen with chapters of 2 and 1 verses, Exod with one of 3.
BOOKS = [('Gen', [2, 1]), ('Exod', [3])]


def write_module(directory, testament, blocks):
  """Writes <testament>.{bzs,bzv,bzz}; `blocks` is a list of blocks, each a list of entries
  (str, or None for an empty entry). Entries are numbered in order across blocks."""
  bzs, bzv, bzz = b'', b'', b''
  for index, entries in enumerate(blocks):
    plain = b''
    for text in entries:
      data = (text or '').encode('utf-8')
      bzv += struct.pack('<IIH', index, len(plain), len(data))
      plain += data
    packed = zlib.compress(plain)
    bzs += struct.pack('<III', len(bzz), len(packed), len(plain))
    bzz += packed
  for suffix, data in (('bzs', bzs), ('bzv', bzv), ('bzz', bzz)):
    (directory / f'{testament}.{suffix}').write_bytes(data)


SYNTHETIC = [
    # Block 0: the headers and Genesis.
    [None, '<milestone type="x-importer"/>',
     '<div osisID="Gen" type="book"/><title type="main">Genesis</title>',  # book intro
     '<chapter n="1" osisID="Gen.1"/>',
     'In the <w lemma="strong:H7225">beginning</w> God.',
     '¶ And <transChange type="added">it was</transChange> so.<note n="a">A note.</note>',
     '<chapter n="2" osisID="Gen.2"/>',
     'Thus <divineName>Lord</divineName> ended. '],
    # Block 1: Exodus, with an empty verse and a verse of markup only.
    ['<div osisID="Exod" type="book"/>', '<chapter n="1"/>',
     'Now these  are\nthe names,', None, '<div type="x-p" sID="p1"/>'],
]


def test_synthetic_module_decodes_exactly(tmp_path):
  write_module(tmp_path, 'ot', SYNTHETIC)
  assert list(sword.read_testament(tmp_path, 'ot', BOOKS)) == [
      sword.Verse('Gen', 1, 1, 'In the beginning God.'),
      sword.Verse('Gen', 1, 2, 'And it was so.'),
      sword.Verse('Gen', 2, 1, 'Thus Lord ended.'),
      sword.Verse('Exod', 1, 1, 'Now these are the names,'),
  ]


def test_entry_count_mismatch_names_the_file(tmp_path):
  write_module(tmp_path, 'ot', SYNTHETIC)
  wrong = [('Gen', [2, 2]), ('Exod', [3])]
  with pytest.raises(ValueError, match=r'ot\.bzv: 13 entries.*expects 14'):
    list(sword.read_testament(tmp_path, 'ot', wrong))


def test_expected_entries_matches_real_kjv_ot_size():
  # KJV ot.bzv has 24115 entries: 2 headers + 39 book intros + 929 chapter intros + 23145.
  assert sword.expected_entries(sword.versification_table()['kjv']['ot']) == 24115


def test_read_conf(tmp_path):
  conf = tmp_path / 'x.conf'
  conf.write_text('[engX]\nDataPath=./modules/texts/ztext/engX/\nVersification=NRSVA\n'
                  'About=Line one\\par line two\n')
  settings = sword.read_conf(conf)
  assert settings['Versification'] == 'NRSVA'
  assert settings['DataPath'] == './modules/texts/ztext/engX/'


@pytest.mark.parametrize('osis, text', [
    ('In the <w lemma="strong:H7225">beginning</w> God', 'In the beginning God'),
    ('<w lemma="a">EN el principio</w> <w lemma="b">crió</w>', 'EN el principio crió'),
    # A note's content goes, and the words on either side stay apart.
    ('God<note placement="foot"><reference type="annotateRef">1:1 </reference>'
     '“Elohim”.</note><w lemma="x">created</w>', 'God created'),
    ('the earth<note n="b">Or, land</note>.', 'the earth.'),
    ('darkness <transChange type="added">was</transChange> upon', 'darkness was upon'),
    ('<title type="psalm" canonical="true">A Psalm of <w>David</w>.</title> LORD, how',
     'LORD, how'),
    ('<title><foreign>א ALEPH.</foreign></title> Blessed', 'Blessed'),
    ('<speaker>Beloved</speaker> <l level="1" sID="a"/>Let him kiss me', 'Let him kiss me'),
    ('¶ And God said', 'And God said'),
    ('<l level="1" sID="a"/>first line<l eID="a"/><l level="2" sID="b"/>second',
     'first line second'),
    ('the <divineName>Lord</divineName> said, <q who="Jesus" marker="">Go</q>.',
     'the Lord said, Go.'),
    ('  spaced \n\t out  ', 'spaced out'),
    ('Tom &amp; Jerry &lt;3', 'Tom & Jerry <3'),
    ('<div sID="gen3" type="x-p"/> <chapter n="2" sID="Gen.2"/>', ''),
])
def test_strip_markup(osis, text):
  assert sword.strip_markup(osis) == text


# ---------------------------------------------------------------------------------------
# The real modules (prepared by `make data`).

@pytest.fixture(scope='module')
def real(real_verses):
  return real_verses


def test_real_known_verses(real):
  assert real['kjv'][('Gen', 1, 1)] == 'In the beginning God created the heaven and the earth.'
  assert real['kjv'][('John', 11, 35)] == 'Jesus wept.'
  assert real['kjv'][('Rev', 22, 21)] == 'The grace of our Lord Jesus Christ be with you all. Amen.'
  # WEB's footnote on "God" sits between two words: it must leave them apart.
  assert real['web'][('Gen', 1, 1)] == 'In the beginning, God created the heavens and the earth.'
  assert real['web'][('John', 11, 35)] == 'Jesus wept.'
  assert real['rv1909'][('Gen', 1, 1)] == 'EN el principio crió Dios los cielos y la tierra.'
  assert real['rv1909'][('John', 11, 35)] == 'Y lloró Jesús.'


def test_real_totals(real):
  # The KJV has 31102 verses in 66 books, none empty; WEB adds the deuterocanon (80 books).
  assert len(real['kjv']) == 31102
  assert len({b for b, _, _ in real['kjv']}) == 66
  assert len({b for b, _, _ in real['web']}) == 80
  assert len({b for b, _, _ in real['rv1909']}) == 66
  assert len(real['rv1909']) == 31084


def test_real_text_is_plain(real):
  for translation, verses in real.items():
    for ref, text in verses.items():
      assert text and text == text.strip(), (translation, ref)
      assert not any(c in text for c in '<>¶'), (translation, ref, text)
      assert '  ' not in text, (translation, ref, text)


# ---------------------------------------------------------------------------------------
# Fetching.

def _fake_extracted_root(root):
  for module in sword.MODULES.values():
    module_dir, conf = sword.module_paths(root, module)
    module_dir.mkdir(parents=True)
    (module_dir / 'nt.bzz').write_bytes(b'')
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f'[{module}]\nVersification=KJV\n')


def test_fetch_skips_when_extracted(tmp_path, monkeypatch):
  _fake_extracted_root(tmp_path / 'sword' / 'root')
  monkeypatch.setattr(sword.subprocess, 'run', lambda *a, **k: pytest.fail('ran a command'))
  assert sword.fetch(tmp_path) == tmp_path / 'sword' / 'root'


def test_fetch_failure_without_root_says_what_to_run(tmp_path, monkeypatch):
  calls = []

  def fake_run(command, **kwargs):
    calls.append(command)
    return sword.subprocess.CompletedProcess(command, 100, '', 'E: no lists')

  monkeypatch.setattr(sword.subprocess, 'run', fake_run)
  monkeypatch.setattr(sword.os, 'geteuid', lambda: 1000)
  with pytest.raises(RuntimeError, match=r'(?s)E: no lists.*apt-get update.*apt-get download'):
    sword.fetch(tmp_path)
  assert calls == [['apt-get', 'download', *sword.PACKAGES]]  # no update without root


def test_fetch_as_root_updates_lists_and_retries(tmp_path, monkeypatch):
  calls = []

  def fake_run(command, **kwargs):
    calls.append(command[:2])
    return sword.subprocess.CompletedProcess(command, 100, '', 'E: no lists')

  monkeypatch.setattr(sword.subprocess, 'run', fake_run)
  monkeypatch.setattr(sword.os, 'geteuid', lambda: 0)
  with pytest.raises(RuntimeError):
    sword.fetch(tmp_path)
  assert calls == [['apt-get', 'download'], ['apt-get', 'update'], ['apt-get', 'download']]
