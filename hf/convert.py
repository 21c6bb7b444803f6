"""Hugging Face model directory <-> a workdir of ours (config.json + Orbax checkpoints).

  python -m hf.convert import --hf_dir=DIR --workdir=W [--scan_layers]
  python -m hf.convert import --hf_dir=DISCRIMINATOR --generator_dir=GENERATOR --workdir=W
  python -m hf.convert export --workdir=W --out=DIR [--step=N]

Families (HF model_type -> the config the workdir starts from): bert, roberta, electra,
deberta (DeBERTa-v2) and the encoder-decoders t5 (T5ForConditionalGeneration, v1.0 and
v1.1: configs/t5.py), bart (BartForConditionalGeneration: configs/bart.py) and marian
(MarianMTModel: configs/translation.py, English -> Spanish).

`import` writes W/config.json (the family's config, size=tiny, with config.model taken
from the HF config.json and config.data.tokenizer_path = DIR) and a step-0 checkpoint of
the training state holding the imported weights (fresh optimizer state, the data iterator
at its start), so eval.py evaluates it and train.py resumes from it. Heads the checkpoint
lacks (MiniLM has no MLM/NSP head) are initialised fresh and named on stdout.

An encoder-decoder's special ids stay the HF model's or the import is refused: our
pipelines and decoding take them from the tokenizer (decoding starts from its bos, ends at
its eos), so the HF config's decoder_start_token_id (and bos_token_id, if set),
eos_token_id and pad_token_id must be the tokenizer's bos, eos and pad. T5 and Marian start
from their pad and BART from its EOS, which no tokenizer of ours can be (its bos is a
token of its own): such models are refused, naming each field and both ids. A T5 import's
sentinels are the ids between the tokenizer's vocabulary and the model's
(config.data.extra_ids); with none, the workdir pretrains by the prefix LM instead of span
corruption.

`export` writes DIR/config.json + model.safetensors (+ the tokenizer), loadable by
`transformers.AutoModel.from_pretrained(DIR)` (encoder-decoders:
`AutoModelForSeq2SeqLM`) offline, with the tokenizer's special ids; an ELECTRA workdir
exports DIR/discriminator (ElectraForPreTraining) and DIR/generator (ElectraForMaskedLM),
as Google publishes them. An ELECTRA import takes the two directories (hf/electra.py). An
encoder_decoder workdir exports as the HF family whose architecture its config.model is
(T5, BART or Marian), or is refused with what keeps it from each.
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
from hf import bart as hf_bart
from hf import deberta as hf_deberta
from hf import electra as hf_electra
from hf import io as hf_io
from hf import marian as hf_marian
from hf import t5 as hf_t5
from models import bert
from models import deberta
from models import electra
from models import encoder_decoder
from training import checkpoint
from training import loop
from training import step as step_lib

# The config module each family starts from (its HF model_type; DeBERTa-v2's is
# 'deberta-v2').
FAMILY_CONFIGS = {'bert': 'configs.bert', 'roberta': 'configs.roberta',
                  'electra': 'configs.electra', 'deberta': 'configs.deberta',
                  't5': 'configs.t5', 'bart': 'configs.bart', 'marian': 'configs.translation'}
# The encoder-decoder families (model_name 'encoder_decoder'): their hf/ modules, in the
# order an export tries them.
SEQ2SEQ = {'t5': hf_t5, 'bart': hf_bart, 'marian': hf_marian}
# The HF model_types an import reads (DeBERTa-v2's family is 'deberta').
MODEL_TYPES = ('bert', 'roberta', 'electra', hf_deberta.MODEL_TYPE, *SEQ2SEQ)
# The model_names a workdir may have to export, and what each is to Hugging Face.
EXPORTS = {'bert': 'BERT, RoBERTa', 'electra': 'ELECTRA', 'deberta': 'DeBERTa-v2',
           'encoder_decoder': 'T5, BART, Marian'}
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


def _config_arg(model_type: str, fields: dict[str, Any],
                tokenizer: subword.SubwordTokenizer) -> str:
  """The family config's argument: size=tiny, and T5's objective (its version is all in
  `fields`)."""
  if model_type != 't5':
    return 'size=tiny'
  # Span corruption's sentinels are the ids above the tokenizer's: without any, the
  # prefix LM (T5's objective that needs none).
  if fields['vocab_size'] > tokenizer.vocab_size:
    return 'size=tiny,objective=span_corruption'
  return 'size=tiny,objective=prefix_lm'


def workdir_config(hf_dir: str | os.PathLike, model_type: str, fields: dict[str, Any],
                   tokenizer: subword.SubwordTokenizer) -> ml_collections.ConfigDict:
  """The family's tiny config with config.model = the HF model's fields and its tokenizer."""
  config = importlib.import_module(FAMILY_CONFIGS[model_type]).get_config(
      _config_arg(model_type, fields, tokenizer))
  config.unlock()
  fields = dict(fields)
  if model_type == 't5':
    # No position table: max_len bounds nothing T5 computes, so the row length stays the
    # config's. The model's ids above the tokenizer's are span corruption's sentinels.
    del fields['max_len']
    config.data.vocab_size = tokenizer.vocab_size
    config.data.extra_ids = max(0, fields['vocab_size'] - tokenizer.vocab_size)
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


def check_special_ids(model_type: str, hf_config: dict[str, Any],
                      tokenizer: subword.SubwordTokenizer) -> None:
  """Raises ValueError naming each special id of an encoder-decoder's HF config that is
  not the tokenizer's: our pipelines and decoding take bos (the decoder's start), eos and
  pad from the tokenizer, so a model whose ids differ cannot keep them."""
  ids = SEQ2SEQ[model_type].special_ids(hf_config)
  wanted = [('decoder_start_token_id', ids['bos_id'], 'bos'),
            ('eos_token_id', ids['eos_id'], 'eos'), ('pad_token_id', ids['pad_id'], 'pad')]
  if isinstance(hf_config.get('bos_token_id'), int):  # BART's <s>: our documents' first token
    wanted.append(('bos_token_id', hf_config['bos_token_id'], 'bos'))
  problems = []
  for field, value, role in wanted:
    ours = getattr(tokenizer, f'{role}_id')
    if value != ours:
      unset = ' (unset: the id it decodes from)' if hf_config.get(field) is None else ''
      problems.append(f'{field}={value}{unset} but the tokenizer\'s {role} '
                      f'{tokenizer.id_to_piece(ours)!r} is {ours}')
  if problems:
    raise ValueError(
        f'the {model_type} model\'s special ids are not its tokenizer\'s: '
        + '; '.join(problems) + '. Our pipelines and decoding take them from the tokenizer '
        '(decoding starts from its bos, ends at its eos), so the model would be trained and '
        'decoded with ids that mean something else to it: refused.')


def _read_hf_dir(hf_dir: str | os.PathLike, *, generator_dir, scan_layers: bool,
                 seed: int) -> tuple[hf_io.Imported, dict[str, Any]]:
  """(the imported directory, its HF config), by model_type."""
  hf_config = hf_io.read_config(hf_dir)
  model_type = hf_config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'{hf_dir}: HF model_type={model_type!r} is not one hf.convert '
                     f'imports; supported: {", ".join(MODEL_TYPES)}')
  if model_type not in SEQ2SEQ:
    return hf_io.load_hf_dir(hf_dir, generator_dir=generator_dir, scan_layers=scan_layers,
                             seed=seed), hf_config
  if generator_dir is not None:
    raise ValueError(f'--generator_dir is for ELECTRA; {hf_dir} holds a {model_type!r} model')
  fields, params, _ = SEQ2SEQ[model_type].load_hf_dir(hf_dir, scan_layers=scan_layers)
  return hf_io.Imported(model_type, fields, params, hf_io.tokenizer_files(hf_dir), ()), hf_config


def import_to_workdir(hf_dir: str | os.PathLike, workdir: str | os.PathLike, *,
                      generator_dir: str | os.PathLike | None = None,
                      scan_layers: bool = False, seed: int = 0) -> dict[str, Any]:
  """Writes `workdir` from an HF directory; returns {'config', 'fresh', 'step'}."""
  workdir = os.fspath(workdir)
  loop.check_workdir(workdir)
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) and os.listdir(
      os.path.join(workdir, 'checkpoints')):
    raise FileExistsError(f'{workdir} already holds checkpoints: import into a new workdir')
  imported, hf_config = _read_hf_dir(hf_dir, generator_dir=generator_dir,
                                     scan_layers=scan_layers, seed=seed)
  if not imported.tokenizer_files:
    raise FileNotFoundError(f'{hf_dir}: no tokenizer files ({", ".join(hf_io.TOKENIZER_FILES)});'
                            ' the model\'s token ids mean nothing without its tokenizer')
  tokenizer = subword.from_pretrained_dir(hf_dir)
  if imported.family in SEQ2SEQ:
    check_special_ids(imported.family, hf_config, tokenizer)
  config = workdir_config(hf_dir, imported.family, imported.fields, tokenizer)
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


def seq2seq_family(cfg: encoder_decoder.EncoderDecoderConfig, workdir: str | os.PathLike):
  """The hf/ module (of SEQ2SEQ) whose HF architecture `cfg` is; else ValueError with
  what keeps it from each."""
  refusals = []
  for model_type, family in SEQ2SEQ.items():
    try:
      family.config_to_hf(cfg, bos_id=0, eos_id=0, pad_id=0)
    except ValueError as e:
      refusals.append(f'{model_type}: {e}')
    else:
      return family
  raise ValueError(f'{workdir}: its encoder_decoder is none of the HF families it could '
                   f'export as ({", ".join(SEQ2SEQ)}):\n  ' + '\n  '.join(refusals))


def export_from_workdir(workdir: str | os.PathLike, out: str | os.PathLike,
                        step: int | None = None) -> list[pathlib.Path]:
  """Writes the HF directory `out` from a workdir's checkpoint (default the latest)."""
  config = read_workdir_config(workdir)
  if config.model_name not in EXPORTS:
    raise ValueError(f'{workdir}: model_name={config.model_name!r} does not export to '
                     'Hugging Face; supported: ' + ', '.join(
                         f'{name!r} ({families})' for name, families in EXPORTS.items()))
  seq2seq = None
  if config.model_name == 'encoder_decoder':  # which family, before building anything
    seq2seq_cfg = encoder_decoder.EncoderDecoderConfig(**config.model)
    seq2seq = seq2seq_family(seq2seq_cfg, workdir)
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
  if seq2seq is not None:
    # The ids our pipelines and decoding used: the tokenizer's (an import checked that
    # they are the HF model's).
    ids = dict(bos_id=exp.tokenizer.bos_id, eos_id=exp.tokenizer.eos_id,
               pad_id=exp.tokenizer.pad_id)
    if seq2seq is hf_bart:  # BART's <s>, which our documents begin with too
      ids['source_bos_id'] = exp.tokenizer.bos_id
    files = seq2seq.save_hf_dir(out, seq2seq_cfg, params, **ids)
    return files + (tokenizer.save_pretrained(out) if tokenizer is not None else [])
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
