"""Prepares everything the configs read, offline: the Bible datasets and their tokenizers.

  python -m data.prepare --data_dir=.data
  python -m data.prepare --data_dir=.data --tokenizer_vocab=8000,32000 --files=my_corpus/

Steps (each skipped when already done, so running it again is cheap):
  1. fetch the SWORD packages (apt-get download + dpkg -x) into DIR/sword;
  2. build bible/en, bible/en_es, bible/kjv_web into DIR/bible;
  3. train the tokenizers of the tiny and small sizes of every config in configs/ with a
     text data block (plus --tokenizer_vocab sizes for bible/en) into DIR/tokenizers;
  4. with --files, build the user's corpus and its tokenizer the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pathlib
import sys
import time

import tensorflow_datasets as tfds

from data import bible
from data import pipeline
from data import sword

# The sizes of each config that run on a CPU, whose tokenizers we train ahead of time.
SIZES = ('tiny', 'small')


def _log(message: str) -> None:
  print(message, flush=True)


def config_modules() -> list[str]:
  """The experiment config modules, configs/*.py but common.py, gpt first."""
  config_dir = pathlib.Path(__file__).resolve().parent.parent / 'configs'
  names = sorted(p.stem for p in config_dir.glob('*.py')
                 if not p.stem.startswith('_') and p.stem != 'common')
  return [f'configs.{n}' for n in sorted(names, key=lambda n: n != 'gpt')]


def config_data(module_name: str, size: str, data_dir: str) -> pipeline.DataConfig | None:
  """The DataConfig of `module:size=...` with data_dir set; None if it has no such size
  or no text data block of our shape (e.g. an image config)."""
  module = importlib.import_module(module_name)
  if size not in getattr(module, 'SIZES', {}):
    return None
  config = module.get_config(f'size={size}')
  data = config.get('data')
  fields = {f.name for f in dataclasses.fields(pipeline.DataConfig)}
  # Fields a config leaves out take DataConfig's defaults (e.g. a language model's task).
  if data is None or not set(data.keys()) <= fields:
    return None
  return dataclasses.replace(pipeline.DataConfig(**data.to_dict()), data_dir=data_dir)


def tokenizer_configs(data_dir: str, extra_vocab: list[int]) -> list[pipeline.DataConfig]:
  """The distinct tokenizer settings of the configs and the extra vocabulary sizes."""
  configs_found = []
  for module in config_modules():
    for size in SIZES:
      try:
        cfg = config_data(module, size, data_dir)
      except Exception as e:  # a config under construction must not stop `make data`
        _log(f'  skipped {module}:size={size}: {type(e).__name__}: {e}')
        continue
      if cfg is not None and not cfg.files:
        configs_found.append(cfg)
  configs_found += [pipeline.DataConfig(data_dir=data_dir, vocab_size=v) for v in extra_vocab]
  unique = {}
  for c in configs_found:
    unique.setdefault((pipeline.dataset_slug(c), c.tokenizer, c.vocab_size), c)
  return list(unique.values())


def prepare_tokenizer(cfg: pipeline.DataConfig) -> None:
  start = time.time()
  tok = pipeline.load_tokenizer(cfg)
  _log(f'  tokenizer {os.path.basename(tok.path)}: vocab {tok.vocab_size} '
       f'({time.time() - start:.1f}s)')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=os.environ.get('CONTEXTUAL_DATA_DIR', '.data'))
  parser.add_argument('--tokenizer_vocab', default='',
                      help='extra comma-separated BPE vocabulary sizes for bible/en')
  parser.add_argument('--files', default='',
                      help="also prepare the user's corpus (a directory or parallel files)")
  args = parser.parse_args(argv)
  data_dir = os.path.abspath(args.data_dir)
  extra_vocab = [int(v) for v in args.tokenizer_vocab.split(',') if v.strip()]
  tfds.disable_progress_bar()
  start = time.time()

  _log(f'data_dir: {data_dir}')
  root = sword.fetch(data_dir)
  _log(f'SWORD modules: {root}')
  for config in ('en', 'en_es', 'kjv_web'):
    counts = bible.prepare(data_dir, config)
    _log(f'bible/{config}: ' + ', '.join(f'{s} {counts[s]}' for s in bible.SPLITS))

  _log('tokenizers:')
  for cfg in tokenizer_configs(data_dir, extra_vocab):
    try:
      prepare_tokenizer(cfg)
    except FileNotFoundError as e:  # a catalog dataset that is not prepared offline
      _log(f'  skipped the tokenizer of {cfg.name}: {str(e).splitlines()[0]}')

  if args.files:
    from data import text_files  # pylint: disable=g-import-not-at-top
    counts = text_files.prepare(args.files, data_dir)
    _log(f'{args.files}: ' + ', '.join(f'{s} {n}' for s, n in sorted(counts.items())))
    prepare_tokenizer(pipeline.DataConfig(files=args.files, data_dir=data_dir))

  _log(f'done in {time.time() - start:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
