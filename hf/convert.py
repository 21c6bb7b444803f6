"""Hugging Face model directory <-> a workdir of ours (config.json + Orbax checkpoints).

  python -m hf.convert import --hf_dir=DIR --workdir=W [--scan_layers]
  python -m hf.convert import --hf_dir=DISCRIMINATOR --generator_dir=GENERATOR --workdir=W
  python -m hf.convert export --workdir=W --out=DIR [--step=N]

`import` writes W/config.json (the family's config, size=tiny, with config.model taken
from the HF config.json and config.data.tokenizer_path = DIR) and a step-0 checkpoint of
the training state holding the imported weights (fresh optimizer state, the data iterator
at its start), so eval.py evaluates it and train.py resumes from it. Heads the checkpoint
lacks (MiniLM has no MLM/NSP head) are initialised fresh and named on stdout.

`export` writes DIR/config.json + model.safetensors (+ the tokenizer), loadable by
`transformers.AutoModel.from_pretrained(DIR)` offline; an ELECTRA workdir exports
DIR/discriminator (ElectraForPreTraining) and DIR/generator (ElectraForMaskedLM), as
Google publishes them. An ELECTRA import takes the two directories (hf/electra.py).
"""

import importlib
import json
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from data import subword
from hf import electra as hf_electra
from hf import io as hf_io
from models import bert
from models import deberta
from models import electra
from training import checkpoint
from training import loop
from training import step as step_lib

# The config module each HF model_type starts from.
FAMILY_CONFIGS = {'bert': 'configs.bert', 'roberta': 'configs.roberta',
                  'electra': 'configs.electra', 'deberta': 'configs.deberta'}
COMMANDS = ('import', 'export')

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when run as a program: as a library, hf.convert must
  not clash with eval.py's or train.py's flags of the same names."""
  flags.DEFINE_string('hf_dir', None, 'import: the HF model directory to read (ELECTRA: '
                      "the discriminator's).")
  flags.DEFINE_string('generator_dir', None, "import, ELECTRA: the generator's HF directory.")
  flags.DEFINE_string('workdir', None, 'The workdir to write (import) or read (export).')
  flags.DEFINE_string('out', None, 'export: the HF model directory to write.')
  flags.DEFINE_integer('step', None, 'export: checkpoint step; default the latest.')
  flags.DEFINE_bool('scan_layers', False, 'import: store the layers scanned (stacked).')
  flags.DEFINE_integer('seed', 0, 'import: seed of heads the checkpoint lacks.')


def workdir_config(hf_dir: str | os.PathLike, model_type: str, fields: dict[str, Any],
                   tokenizer: subword.SubwordTokenizer) -> ml_collections.ConfigDict:
  """The family's tiny config with config.model = the HF model's fields and its tokenizer."""
  config = importlib.import_module(FAMILY_CONFIGS[model_type]).get_config('size=tiny')
  config.unlock()
  unknown = sorted(set(fields) - set(config.model))
  if unknown:
    raise ValueError(f'{FAMILY_CONFIGS[model_type]}: config.model lacks fields {unknown}')
  for name, value in fields.items():
    # vocab_size is shared with config.data (one reference); max_len replaces the config's
    # seq_len + offset: the position table is the checkpoint's, whatever length we train at.
    config.model[name] = value
  config.data.tokenizer = tokenizer.kind.name
  config.data.tokenizer_path = os.path.abspath(hf_dir)
  config.lock()
  return config


def import_to_workdir(hf_dir: str | os.PathLike, workdir: str | os.PathLike, *,
                      generator_dir: str | os.PathLike | None = None,
                      scan_layers: bool = False, seed: int = 0) -> dict[str, Any]:
  """Writes `workdir` from an HF directory; returns {'config', 'fresh', 'step'}."""
  workdir = os.fspath(workdir)
  loop.check_workdir(workdir)
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) and os.listdir(
      os.path.join(workdir, 'checkpoints')):
    raise FileExistsError(f'{workdir} already holds checkpoints: import into a new workdir')
  imported = hf_io.load_hf_dir(hf_dir, generator_dir=generator_dir, scan_layers=scan_layers,
                              seed=seed)
  if not imported.tokenizer_files:
    raise FileNotFoundError(f'{hf_dir}: no tokenizer files ({", ".join(hf_io.TOKENIZER_FILES)});'
                            ' the model\'s token ids mean nothing without its tokenizer')
  config = workdir_config(hf_dir, imported.family, imported.fields,
                          subword.from_pretrained_dir(hf_dir))
  exp = loop.build(config)
  abstract, shardings = exp.abstract_state()
  problems = checkpoint.mismatched_parameters(imported.params, abstract.params)
  if problems:  # the config map and the model disagree: a bug of ours, not the user's
    raise AssertionError('imported parameters do not fit the model:\n  ' + '\n  '.join(problems))
  # The state around the imported weights, without initialising the model (15 s for
  # MiniLM): the optimizer's state starts from zeros whatever the weights.
  params = jax.tree.map(jax.device_put, imported.params, shardings.params)
  with jax.set_mesh(exp.mesh):
    state = jax.jit(lambda p: step_lib.TrainState.create(apply_fn=exp.model.apply, params=p,
                                                         tx=exp.tx),
                    out_shardings=shardings)(params)
  checkpoint.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False, writer=True)
  try:
    data_iter = loop.train_iterator(exp, loop.process_rows(exp))
    checkpoint.save(mngr, 0, state, data_iter, config.to_dict())
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return {'config': config, 'fresh': imported.fresh, 'step': 0}


def read_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: is {workdir} a workdir?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def export_from_workdir(workdir: str | os.PathLike, out: str | os.PathLike,
                        step: int | None = None) -> list[pathlib.Path]:
  """Writes the HF directory `out` from a workdir's checkpoint (default the latest)."""
  config = read_workdir_config(workdir)
  if config.model_name not in ('bert', 'electra', 'deberta'):
    raise ValueError(f"{workdir}: model_name={config.model_name!r}; only 'bert' (BERT and "
                     "RoBERTa), 'electra' and 'deberta' export to Hugging Face so far")
  data_only = [-1] + [1] * (len(config.mesh.axes) - 1)
  exp = loop.build(config, mesh_shape=data_only)
  abstract, shardings = exp.abstract_state()
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{workdir}: no checkpoint to export')
    state = checkpoint.restore(mngr, step, abstract, shardings)
  finally:
    mngr.close()
  tokenizer = exp.tokenizer if isinstance(exp.tokenizer, subword.SubwordTokenizer) else None
  if tokenizer is None:
    print(f'note: the {config.data.tokenizer!r} tokenizer has no HF form; exported without it')
  params = jax.device_get(state.params)
  if config.model_name == 'electra':
    return hf_electra.save_hf_dirs(out, electra.ElectraConfig(**config.model), params, tokenizer)
  if config.model_name == 'deberta':
    return hf_io.save_hf_dir(out, deberta.DebertaConfig(**config.model), params, tokenizer)
  return hf_io.save_hf_dir(out, bert.BertConfig(**config.model), params, tokenizer)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: python -m hf.convert {{{"|".join(COMMANDS)}}} --flags...')
  if not FLAGS['verbosity'].present:  # Orbax logs every save at INFO, as in eval.py
    logging.set_verbosity(logging.WARNING)
  if argv[1] == 'import':
    if not (FLAGS.hf_dir and FLAGS.workdir):
      raise app.UsageError('import needs --hf_dir and --workdir')
    result = import_to_workdir(FLAGS.hf_dir, FLAGS.workdir, generator_dir=FLAGS.generator_dir,
                               scan_layers=FLAGS.scan_layers, seed=FLAGS.seed)
    if result['fresh']:
      print(f'{FLAGS.hf_dir} has no {", ".join(result["fresh"])} head(s): initialised fresh '
            f'(seed {FLAGS.seed})')
    print(f'wrote {FLAGS.workdir}/config.json and checkpoint step 0')
  else:
    if not (FLAGS.workdir and FLAGS.out):
      raise app.UsageError('export needs --workdir and --out')
    files = export_from_workdir(FLAGS.workdir, FLAGS.out, FLAGS.step)
    print('wrote ' + ', '.join(str(f) for f in files))
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
