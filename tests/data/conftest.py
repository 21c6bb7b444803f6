"""Fixtures shared by the data tests: the prepared real corpus, if any."""

import os
import pathlib

import pytest

from data import sword


@pytest.fixture(scope='session')
def real_data_dir() -> pathlib.Path:
  """$CONTEXTUAL_DATA_DIR once `make data` has prepared it (CI does); else skip."""
  path = os.environ.get('CONTEXTUAL_DATA_DIR')
  if not path or not sword.is_fetched(pathlib.Path(path) / 'sword' / 'root'):
    message = 'real corpus not prepared: run `make data` (sets CONTEXTUAL_DATA_DIR)'
    if os.environ.get('CI'):  # `make test` prepares it, so in CI its absence is a failure
      pytest.fail(message)
    pytest.skip(message)
  return pathlib.Path(path)


@pytest.fixture(scope='session')
def real_verses(real_data_dir) -> dict[str, dict[tuple[str, int, int], str]]:
  """{translation: {(book, chapter, verse): text}} read from the prepared SWORD modules."""
  root = real_data_dir / 'sword' / 'root'
  return {t: {(v.book, v.chapter, v.verse): v.text for v in sword.read_translation(root, t)}
          for t in sword.MODULES}
