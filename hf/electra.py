"""ELECTRA <-> Hugging Face `transformers`: `ElectraForPreTraining` (the discriminator) and
`ElectraForMaskedLM` (the generator), each its own directory as Google publishes them
(google/electra-*-discriminator, google/electra-*-generator).

HF holds the two as separate models, each with its own copy of the embeddings; ours share
one module (models/electra.py). So an import takes the discriminator's embeddings and
requires the generator's to be equal (they are in Google's checkpoints, which were trained
shared), and an export writes the shared ones into both. A discriminator imported without
its generator gets a fresh generator of `generator_fraction` (named in `fresh`): enough to
fine-tune the discriminator or to continue pretraining.

Layer names are BERT's (hf/bert.py's table); around them:
    electra.embeddings.*              -> embeddings/{token_embed, position_embed, ...}
    electra.embeddings_project        -> {discriminator,generator}/embed_project  (E != D)
    discriminator_predictions.dense   -> rtd_dense;  .dense_prediction -> rtd_out
    generator_predictions.dense/LN    -> generator/mlm_dense, mlm_ln
    generator_lm_head.bias            -> generator/mlm_bias (its weight is the tied table)
"""

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from hf import bert as hf_bert
from hf.bert import COPY, LINEAR, Table
from models import electra

_BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')
P = 'electra.'


# ------------------------------------------------------------------------------- config


def _encoder_fields(hf: Mapping[str, Any], role: str) -> dict[str, Any]:
  """BertConfig fields of one HF ElectraConfig (BERT's map; ELECTRA's own fields after)."""
  if hf.get('model_type') != 'electra':
    hf_bert._reject('model_type', hf.get('model_type'), f'the {role} must be an electra model')
  fields = hf_bert.config_from_hf({**hf, 'model_type': 'bert'})
  embedding_size = hf.get('embedding_size', hf['hidden_size'])
  fields.update(next_sentence=False, embedding_size=embedding_size)
  return fields


def config_from_hf(discriminator: Mapping[str, Any],
                   generator: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """ElectraConfig fields from the discriminator's (and the generator's) config.json."""
  fields = _encoder_fields(discriminator, 'discriminator')
  if fields['embedding_size'] == fields['embed_dim']:
    fields['embedding_size'] = 0
  fields.update(generator_fraction=0.25, generator_num_layers=0)
  if generator is None:
    return fields
  gen = _encoder_fields(generator, 'generator')
  if generator.get('hidden_act', 'gelu') != 'gelu':
    hf_bert._reject('hidden_act', generator['hidden_act'], "the generator's MLM head in HF "
                    'is always exact gelu and ours uses the encoder activation')
  shared = ('vocab_size', 'max_len', 'type_vocab_size', 'norm_epsilon', 'activation')
  width = fields['embedding_size'] or fields['embed_dim']  # E, the embeddings' width
  for name in shared + ('embedding_size',):
    ours = width if name == 'embedding_size' else fields[name]
    if gen[name] != ours:
      raise ValueError(f'HF generator config: {name}={gen[name]!r} differs from the '
                       f"discriminator's {ours!r}; ours share one embedding module")
  fraction = gen['embed_dim'] / fields['embed_dim']
  fields.update(generator_fraction=fraction,
                generator_num_layers=0 if gen['num_layers'] == fields['num_layers']
                else gen['num_layers'])
  derived = electra.ElectraConfig(**fields).generator
  for ours, hf_name in (('num_heads', 'num_attention_heads'), ('mlp_dim', 'intermediate_size')):
    if getattr(derived, ours) != gen[ours]:
      raise ValueError(f'HF generator config: {hf_name}={gen[ours]} is not the '
                       f"discriminator's scaled by hidden_size {gen['embed_dim']}/"
                       f"{fields['embed_dim']} ({getattr(derived, ours)}), as ours derive it")
  return fields


def _encoder_to_hf(cfg, architecture: str) -> dict[str, Any]:
  hf = hf_bert.config_to_hf(dataclasses.replace(cfg, embedding_size=0, mlm_head=True,
                                                next_sentence=False))
  hf.update(architectures=[architecture], model_type='electra',
            embedding_size=cfg.embedding_width)
  return hf


def config_to_hf(cfg: electra.ElectraConfig) -> dict[str, dict[str, Any]]:
  """{'discriminator': config.json of ElectraForPreTraining, 'generator': of *ForMaskedLM}."""
  if cfg.activation != 'gelu':
    raise ValueError(f"ElectraConfig.activation={cfg.activation!r}: HF's generator head is "
                     'always exact gelu')
  return {'discriminator': _encoder_to_hf(cfg.discriminator, 'ElectraForPreTraining'),
          'generator': _encoder_to_hf(cfg.generator, 'ElectraForMaskedLM')}


# ------------------------------------------------------------------------------ tables


def _dense(ours: str, hf: str) -> Table:
  return [(f'{ours}/kernel', f'{hf}.weight', LINEAR), (f'{ours}/bias', f'{hf}.bias', COPY)]


def _encoder_table(cfg, ours: str) -> Table:
  """One encoder's body: the projection from E (when widths differ) and its layers."""
  table = []
  if cfg.embedding_width != cfg.embed_dim:
    table += _dense(f'{ours}/embed_project', f'{P}embeddings_project')
  for i in range(cfg.num_layers):
    table += hf_bert._layer_table(i, P, ours_prefix=f'{ours}/')
  return table


def tables(cfg: electra.ElectraConfig) -> dict[str, Table]:
  """Name maps by HF model: each ours -> that model's names, with the config to reshape by."""
  embeddings = [('embeddings/token_embed/embedding', f'{P}embeddings.word_embeddings.weight', COPY),
                ('embeddings/position_embed/embedding',
                 f'{P}embeddings.position_embeddings.weight', COPY),
                ('embeddings/type_embed/embedding',
                 f'{P}embeddings.token_type_embeddings.weight', COPY),
                ('embeddings/ln_embed/scale', f'{P}embeddings.LayerNorm.weight', COPY),
                ('embeddings/ln_embed/bias', f'{P}embeddings.LayerNorm.bias', COPY)]
  discriminator = (embeddings + _encoder_table(cfg.discriminator, 'discriminator')
                   + _dense('rtd_dense', 'discriminator_predictions.dense')
                   + _dense('rtd_out', 'discriminator_predictions.dense_prediction'))
  generator = (embeddings + _encoder_table(cfg.generator, 'generator')
               + _dense('generator/mlm_dense', 'generator_predictions.dense')
               + [('generator/mlm_ln/scale', 'generator_predictions.LayerNorm.weight', COPY),
                  ('generator/mlm_ln/bias', 'generator_predictions.LayerNorm.bias', COPY),
                  ('generator/mlm_bias', 'generator_lm_head.bias', COPY)])
  return {'discriminator': discriminator, 'generator': generator}


def _reshape_config(cfg: electra.ElectraConfig, ours: str):
  """The encoder config whose N, H, D reshape `ours` (a generator path or anything else)."""
  return cfg.generator if ours.startswith('generator/') else cfg.discriminator


# ------------------------------------------------------------------------------ params


def expected_shapes(cfg: electra.ElectraConfig) -> dict[str, jax.ShapeDtypeStruct]:
  cfg = dataclasses.replace(cfg, scan_layers=False)
  tree = jax.eval_shape(electra.Electra(cfg).init, jax.random.key(0),
                        jnp.zeros((1, 1), jnp.int32))
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree)['params'], sep='/')


def _canonical(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Body names with the 'electra.' prefix (a bare ElectraModel saves them without)."""
  heads = ('discriminator_predictions.', 'generator_predictions.', 'generator_lm_head.')
  return {name if name.startswith((P, *heads)) else P + name: value
          for name, value in state.items() if not name.endswith(_BUFFERS)}


def _read(role: str, table: Table, hf: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
  known = {hf_name for _, hf_name, _ in table}
  tied = {'generator_lm_head.weight': f'{P}embeddings.word_embeddings.weight'}
  unexpected = sorted(set(hf) - known - set(tied))
  if unexpected:
    raise ValueError(f'unexpected HF {role} parameters (not in our name map): {unexpected}')
  for name, twin in tied.items():
    if name in hf and not np.array_equal(hf[name], hf[twin]):
      raise ValueError(f'HF {name} differs from {twin}: our generator head is tied to '
                       'the token embeddings')
  missing = [hf_name for _, hf_name, _ in table if hf_name not in hf]
  if missing:
    raise ValueError(f'HF {role} checkpoint lacks {missing}')
  return {ours: reshape.to_ours(np.asarray(hf[hf_name]), _reshape_config(cfg, ours))
          for ours, hf_name, reshape in table}


def params_from_hf(discriminator: Mapping[str, np.ndarray],
                   generator: Mapping[str, np.ndarray] | None, cfg: electra.ElectraConfig, *,
                   seed: int = 0) -> tuple[dict, tuple[str, ...]]:
  """Our param tree from the two HF state dicts (the generator's may be None: it is then
  initialised fresh from `seed`), and the parts initialised fresh."""
  groups = tables(cfg)
  flat = _read('discriminator', groups['discriminator'], _canonical(discriminator), cfg)
  shapes = expected_shapes(cfg)
  fresh = []
  if generator is None:
    fresh.append('generator')
    rng = np.random.default_rng(seed)
    for ours, _, _ in groups['generator']:
      if ours not in flat:
        flat[ours] = hf_bert.fresh_head(ours, shapes[ours].shape, cfg, rng)
  else:
    gen = _read('generator', groups['generator'], _canonical(generator), cfg)
    for ours, value in gen.items():
      if ours.startswith('embeddings/') and not np.array_equal(value, flat[ours]):
        raise ValueError(f"HF generator's {ours} differs from the discriminator's: ours "
                         'share one embedding module (import the discriminator alone to '
                         'fine-tune it)')
      flat[ours] = value
  # The pooler: ours has one per encoder (fine-tuning's 'cls' pooling); HF's ELECTRA none.
  rng = np.random.default_rng(seed + 1)
  for ours, shape in shapes.items():
    if ours not in flat:
      flat[ours] = hf_bert.fresh_head(ours, shape.shape, cfg, rng)
  wrong = [f'{ours} {flat[ours].shape}, expected {shapes[ours].shape}' for ours in shapes
           if flat[ours].shape != shapes[ours].shape]
  if wrong:
    raise ValueError('HF shapes do not fit the config: ' + '; '.join(wrong))
  flat = {k: np.ascontiguousarray(flat[k], dtype=shapes[k].dtype) for k in shapes}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  if cfg.scan_layers:
    for encoder in ('discriminator', 'generator'):
      num_layers = getattr(cfg, encoder).num_layers
      params[encoder] = hf_bert.stack_layers(params[encoder], num_layers)
  return params, tuple(fresh)


def params_to_hf(params: Mapping[str, Any], cfg: electra.ElectraConfig
                 ) -> dict[str, dict[str, np.ndarray]]:
  """{'discriminator': state dict, 'generator': state dict} of our param tree."""
  params = jax.tree.map(np.asarray, flax.core.meta.unbox(dict(params)))
  params = {**params, **{encoder: hf_bert.unstack_layers(params[encoder])
                         for encoder in ('discriminator', 'generator')}}
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return {role: {hf_name: np.ascontiguousarray(
                     reshape.to_hf(flat[ours], _reshape_config(cfg, ours)))
                 for ours, hf_name, reshape in table}
          for role, table in tables(cfg).items()}


# ---------------------------------------------------------------------------- directories

ROLES = ('discriminator', 'generator')


def save_hf_dirs(out: str | os.PathLike, cfg: electra.ElectraConfig, params, tokenizer=None
                 ) -> list[pathlib.Path]:
  """Writes OUT/discriminator and OUT/generator, each loadable by `from_pretrained`."""
  configs, states = config_to_hf(cfg), params_to_hf(params, cfg)
  files = []
  for role in ROLES:
    directory = pathlib.Path(out) / role
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / 'model.safetensors'
    safetensors.numpy.save_file(states[role], os.fspath(weights), metadata={'format': 'pt'})
    config_path = directory / 'config.json'
    config_path.write_text(json.dumps(configs[role], indent=2) + '\n', encoding='utf-8')
    files += [config_path, weights]
    if tokenizer is not None:
      files += tokenizer.save_pretrained(directory)
  return files
