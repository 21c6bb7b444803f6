"""BART (transformers' BartForConditionalGeneration) <-> our encoder-decoder
(models/encoder_decoder.py).

Marian's maps (hf/marian.py) with what BART adds on top; the blocks, the shared token
table, final_logits_bias and the tied copies go through hf/marian.py unchanged:
  * the config: an HF config.json dict (or a `BartConfig`) <-> `EncoderDecoderConfig`
    fields (`config_fields`, `config_to_hf`), refusing with the field's name whatever our
    model cannot represent;
  * the parameters: an HF state dict of numpy arrays <-> our param tree (`params_from_hf`,
    `params_to_hf`): marian's table plus each side's position table and embedding norm.

BART is Marian's post-LN block (nn.LayerNorm at 1e-5, erf GELU by default, one token table
for source, target and output) with learned positions instead of sinusoids and a LayerNorm
over each side's embeddings (tokens + positions, `layernorm_embedding`; ours `ln_embed`,
`embed_norm=True`). Embeddings are not scaled by default (`scale_embedding=False`).

Positions: BART's learned table has max_position_embeddings + 2 rows and position p reads
row p + 2 (fairseq once numbered positions from pad_id + 1 = 2). Rows 0 and 1 are never
read: an import drops them (ours has max_len = max_position_embeddings rows, position p at
row p) and an export writes them as zeros, so HF -> ours -> HF gives back every other array
byte for byte and those two rows as zeros.

What is not a parameter of ours: `final_logits_bias` [1, V] (zeros in every model
transformers builds; an import refuses a nonzero one, an export writes zeros), as Marian's.

Special ids: BART decodes from `decoder_start_token_id` (its EOS, 2) to `eos_token_id` (2);
its <s> (bos_token_id 0) begins the source and the targets, after the start token.
`special_ids` gives them as models/seq2seq_decoding.py's `translate` takes them.

Dropout: as Marian's. Ours has one `dropout_rate` and no dropout of the MLP's hidden
activation, so `attention_dropout` must equal `dropout` and `activation_dropout` be 0 (the
published facebook/bart-* configs set activation_dropout 0.1: set it to 0 in config.json
to import them; at inference no dropout matters).
"""

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import flax
import jax
import numpy as np
import safetensors.numpy

from hf import io as hf_io
from hf import marian as hf_marian
from hf.bert import COPY, Reshape, Table, read_groups, write_groups
from hf.marian import expected_shapes, stack_layers, unstack_layers
from models import encoder_decoder

MODEL_TYPE = 'bart'
_ACTIVATIONS = hf_marian._ACTIVATIONS  # pylint: disable=protected-access
_HF_ACTIVATIONS = hf_marian._HF_ACTIVATIONS  # pylint: disable=protected-access
_reject = hf_marian._reject  # pylint: disable=protected-access
_as_dict = hf_marian._as_dict  # pylint: disable=protected-access
# What HF's BART is, whatever a config of ours may default to.
_BART = dict(norm_position='post', norm='layer', norm_epsilon=1e-5, use_bias=True,
             attention='scaled_dot', position='learned', embed_norm=True, mask='causal',
             encoder_mask='bidirectional', share_embeddings=True, tie_output=True,
             scale_tied_output=False)
# Keys of transformers 3's BartConfig (fairseq's variants: mBART's pre-LN and final norms,
# Blenderbot's, sinusoids, a logits bias) and the value that is BART's. transformers 5
# ignores them and builds BART whatever they say, so weights trained under another value
# would load into the wrong model: refused.
_LEGACY = dict(normalize_before=False, add_final_layer_norm=False,
               do_blenderbot_90_layernorm=False, normalize_embedding=True,
               static_position_embeddings=False, add_bias_logits=False,
               extra_pos_embeddings=2)
POSITION_OFFSET = 2  # BART reads position p from row p + 2 of its table.
FINAL_LOGITS_BIAS = hf_marian.FINAL_LOGITS_BIAS
_TIED = hf_marian._TIED  # pylint: disable=protected-access  (the shared table's other names)
# fairseq's version buffers, which transformers ignores on load too.
_IGNORED = ('model.encoder.version', 'model.decoder.version')


# ------------------------------------------------------------------------------- config


def config_fields(hf_config) -> dict[str, Any]:
  """EncoderDecoderConfig fields (`EncoderDecoderConfig(**fields)`) of a BART config
  (a config.json dict or a `transformers.BartConfig`)."""
  hf = _as_dict(hf_config)
  if hf.get('model_type') != MODEL_TYPE:
    _reject('model_type', hf.get('model_type'), f'not {MODEL_TYPE!r}')
  act = hf.get('activation_function', 'gelu')
  if act not in _ACTIVATIONS:
    _reject('activation_function', act, f'not one of {sorted(_ACTIVATIONS)}')
  for field, other in (('decoder_attention_heads', 'encoder_attention_heads'),
                       ('decoder_ffn_dim', 'encoder_ffn_dim')):
    if hf[field] != hf[other]:
      _reject(field, hf[field], f'our stacks share one width, and {other}={hf[other]!r}')
  if not hf.get('tie_word_embeddings', True):
    _reject('tie_word_embeddings', hf['tie_word_embeddings'],
            'one table for source, target and output is all we map')
  for field, value in _LEGACY.items():
    if field in hf and hf[field] != value:
      _reject(field, hf[field], f'BART has {value!r}; ours cannot hold that variant')
  for field in ('encoder_layerdrop', 'decoder_layerdrop', 'activation_dropout'):
    if hf.get(field, 0.0):
      _reject(field, hf[field], 'ours has no such dropout (0 only)')
  dropout = float(hf.get('dropout', 0.1))
  if float(hf.get('attention_dropout', 0.0)) != dropout:
    _reject('attention_dropout', hf.get('attention_dropout', 0.0),
            f'ours drops attention probabilities at its one dropout_rate, and '
            f'dropout={dropout!r} differs (set both alike; at inference neither matters)')
  if not hf.get('is_encoder_decoder', True) or hf.get('is_decoder', False):
    _reject('is_encoder_decoder', hf.get('is_encoder_decoder'),
            'BartForConditionalGeneration only')
  return dict(
      vocab_size=hf['vocab_size'], max_len=hf['max_position_embeddings'],
      num_layers=hf['encoder_layers'], num_decoder_layers=hf['decoder_layers'],
      num_heads=hf['encoder_attention_heads'], embed_dim=hf['d_model'],
      mlp_dim=hf['encoder_ffn_dim'], activation=_ACTIVATIONS[act],
      scale_embeddings=bool(hf.get('scale_embedding', False)),
      init_stddev=float(hf.get('init_std', 0.02)), dropout_rate=dropout,
      scale_residual_init=False, **_BART)


def special_ids(hf_config) -> dict[str, int]:
  """`translate`'s bos_id, eos_id, pad_id: BART decodes from decoder_start_token_id (as
  generate() does, bos_token_id where that is unset)."""
  hf = _as_dict(hf_config)
  eos = hf['eos_token_id']
  if not isinstance(eos, int):
    _reject('eos_token_id', eos, 'one end token is all translate takes')
  start = hf.get('decoder_start_token_id')
  start = hf.get('bos_token_id') if start is None else start
  if not isinstance(start, int):
    _reject('decoder_start_token_id', start, 'decoding needs a start token')
  return dict(bos_id=start, eos_id=eos, pad_id=hf['pad_token_id'])


def config_to_hf(cfg: encoder_decoder.EncoderDecoderConfig, *, bos_id: int, eos_id: int,
                 pad_id: int, source_bos_id: int | None = None) -> dict[str, Any]:
  """The config.json of `cfg` for transformers' BartForConditionalGeneration, decoding
  from `bos_id` (decoder_start_token_id) to `eos_id`, with no forced BOS or EOS (ours
  forces none). bos_token_id (the source's <s>) is `source_bos_id`: unset unless the
  caller knows it (the tokenizer's)."""
  for field, value in _BART.items():
    if getattr(cfg, field) != value:
      raise ValueError(f'EncoderDecoderConfig.{field}={getattr(cfg, field)!r}: HF BART '
                       f'needs {value!r}')
  if cfg.activation not in _HF_ACTIVATIONS:
    raise ValueError(f'EncoderDecoderConfig.activation={cfg.activation!r}: HF BART has '
                     f'none of it (one of {sorted(_HF_ACTIVATIONS)})')
  decoder_layers = cfg.num_decoder_layers or cfg.num_layers
  return dict(
      architectures=['BartForConditionalGeneration'], model_type=MODEL_TYPE,
      is_encoder_decoder=True, vocab_size=cfg.vocab_size,
      max_position_embeddings=cfg.max_len, d_model=cfg.embed_dim,
      encoder_layers=cfg.num_layers, decoder_layers=decoder_layers,
      encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
      encoder_ffn_dim=cfg.mlp_dim, decoder_ffn_dim=cfg.mlp_dim,
      activation_function=_HF_ACTIVATIONS[cfg.activation],
      scale_embedding=cfg.scale_embeddings, init_std=cfg.init_stddev,
      dropout=cfg.dropout_rate, attention_dropout=cfg.dropout_rate, activation_dropout=0.0,
      encoder_layerdrop=0.0, decoder_layerdrop=0.0, tie_word_embeddings=True,
      pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=bos_id,
      bos_token_id=source_bos_id, forced_bos_token_id=None, forced_eos_token_id=None,
      dtype=cfg.param_dtype)


# ---------------------------------------------------------------------------- name map


def _pad_rows(x_LD: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros((POSITION_OFFSET, x_LD.shape[1]), x_LD.dtype), x_LD])


# HF's [max_len + 2, D] table <-> ours [max_len, D]: rows 0 and 1 (never read) dropped on
# import, zeros on export.
POSITIONS = Reshape(lambda w, c: w[POSITION_OFFSET:], lambda x, c: _pad_rows(x))


def embedding_table(cfg: encoder_decoder.EncoderDecoderConfig) -> Table:
  """(our path, HF name, reshape) of what BART adds to Marian: each side's positions and
  embedding norm."""
  del cfg  # The same four rows per side at any size.
  rows = []
  for side in ('encoder', 'decoder'):
    hf = f'model.{side}'
    rows += [(f'{side}/position_embed/embedding', f'{hf}.embed_positions.weight', POSITIONS),
             (f'{side}/ln_embed/scale', f'{hf}.layernorm_embedding.weight', COPY),
             (f'{side}/ln_embed/bias', f'{hf}.layernorm_embedding.bias', COPY)]
  return rows


def table(cfg: encoder_decoder.EncoderDecoderConfig) -> Table:
  """(our unrolled path, HF name, reshape) of every parameter."""
  return embedding_table(cfg) + hf_marian.table(cfg)


def _canonical(name: str) -> str:
  """A bare BartModel's names lack the 'model.' prefix (as hf/marian.py reads them)."""
  top = name.startswith('model.') or name in (FINAL_LOGITS_BIAS, 'lm_head.weight')
  return name if top else 'model.' + name


# ------------------------------------------------------------------------------ params


def params_from_hf(state: Mapping[str, np.ndarray],
                   cfg: encoder_decoder.EncoderDecoderConfig) -> dict:
  """Our param tree (scanned if `cfg.scan_layers`) from a BartForConditionalGeneration (or
  bare BartModel) state dict of numpy arrays.

  Raises ValueError for unexpected or missing names, tied copies that differ from
  model.shared.weight, a nonzero final_logits_bias, and shapes that do not fit `cfg` (a
  position table must have max_len + 2 rows).
  """
  original = {_canonical(name): name for name in state}
  own = embedding_table(cfg)
  own_names = {hf_name for _, hf_name, _ in own}
  known = {hf_name for _, hf_name, _ in table(cfg)} | {*_TIED, FINAL_LOGITS_BIAS, *_IGNORED}
  unexpected = sorted(original[n] for n in original if n not in known)
  if unexpected:
    raise ValueError(f'unexpected HF parameters for {MODEL_TYPE} (not in our name map): '
                     f'{unexpected}')
  # The blocks, the shared table, its tied copies and final_logits_bias: Marian's names.
  marian_state = {name: state[name] for canonical, name in original.items()
                  if canonical not in own_names and canonical not in _IGNORED}
  body = hf_marian.params_from_hf(marian_state, dataclasses.replace(cfg, scan_layers=False))
  shapes = expected_shapes(cfg)
  hf = {canonical: state[original[canonical]] for canonical in own_names
        if canonical in original}
  flat, _ = read_groups(hf, {'body': own}, cfg, original, shapes)
  flat = {k: np.ascontiguousarray(v, dtype=shapes[k].dtype) for k, v in flat.items()}
  flat.update(flax.traverse_util.flatten_dict(body, sep='/'))
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  return stack_layers(params) if cfg.scan_layers else params


def params_to_hf(params: Mapping[str, Any],
                 cfg: encoder_decoder.EncoderDecoderConfig) -> dict[str, np.ndarray]:
  """The BartForConditionalGeneration state dict (numpy, contiguous) of our param tree,
  unrolled or scanned: position tables with two leading zero rows, a zero
  final_logits_bias, no tied copies (as save_pretrained writes)."""
  params = unstack_layers(jax.tree.map(np.asarray, flax.core.meta.unbox(dict(params))))
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  own = embedding_table(cfg)
  own_paths = {ours for ours, _, _ in own}
  rest = {path: x for path, x in flat.items() if path not in own_paths}
  state = hf_marian.params_to_hf(flax.traverse_util.unflatten_dict(rest, sep='/'), cfg)
  state.update(write_groups({path: flat[path] for path in own_paths if path in flat},
                            {'body': own}, cfg))
  return state


# -------------------------------------------------------------------------- directories


def load_hf_dir(directory: str | os.PathLike, *, scan_layers: bool = False
                ) -> tuple[dict[str, Any], dict, dict[str, int]]:
  """(our config fields, our params, translate's special ids) of a
  BartForConditionalGeneration directory (config.json + model.safetensors; pickles are
  refused)."""
  hf_config = hf_io.read_config(directory)
  fields = {**config_fields(hf_config), 'scan_layers': scan_layers}
  params = params_from_hf(hf_io.read_safetensors(directory),
                          encoder_decoder.EncoderDecoderConfig(**fields))
  return fields, params, special_ids(hf_config)


def save_hf_dir(directory: str | os.PathLike, cfg: encoder_decoder.EncoderDecoderConfig,
                params: Mapping[str, Any], *, bos_id: int, eos_id: int, pad_id: int,
                source_bos_id: int | None = None) -> list[pathlib.Path]:
  """Writes config.json + model.safetensors that
  `BartForConditionalGeneration.from_pretrained` loads offline; returns the paths."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                           source_bos_id=source_bos_id)
  weights = directory / hf_io.WEIGHTS
  # transformers checks the 'format' metadata; 'pt' says the names are PyTorch's.
  safetensors.numpy.save_file(params_to_hf(params, cfg), os.fspath(weights),
                              metadata={'format': 'pt'})
  config_path = directory / hf_io.CONFIG
  config_path.write_text(json.dumps(hf_config, indent=2) + '\n', encoding='utf-8')
  return [config_path, weights]
