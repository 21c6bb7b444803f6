"""Marian (transformers' MarianMTModel) <-> our encoder-decoder (models/encoder_decoder.py).

The same two maps as hf/bert.py, with its reshapes:
  * the config: an HF config.json dict (or a `MarianConfig`) <-> `EncoderDecoderConfig`
    fields (`config_fields`, `config_to_hf`), refusing with the field's name whatever our
    model cannot represent;
  * the parameters: an HF state dict of numpy arrays <-> our param tree (`params_from_hf`,
    `params_to_hf`), from one table of (our path, HF name, reshape).

Marian is the 2017 Transformer as Marian-NMT trains it, and ours once configured so:
post-LN blocks (nn.LayerNorm at torch's epsilon 1e-5, no final or embedding norm), one
token table for source, target and output (`share_encoder_decoder_embeddings`, tied
lm_head), embeddings × sqrt(D) (`scale_embedding`), attention q·k / sqrt(H), and fixed
unit sinusoids at positions 0, 1, ... of each side, laid out [sin of every frequency | cos
of every frequency] (`sinusoid_layout='concatenated'`; the paper's interleaved PE(p, 2i),
PE(p, 2i+1) is our default).

What is not a parameter of ours:
  * `final_logits_bias` [1, V], a buffer added to the logits: zeros in every model
    transformers builds, and our output projection has no bias. An import checks it is
    all zero and refuses otherwise (converted Marian-NMT checkpoints may carry a real
    one); an export writes zeros.
  * `model.{encoder,decoder}.embed_positions.weight`, the frozen sinusoid tables (saved by
    `state_dict()`, not by `save_pretrained`): an import checks they are our sinusoids.
  * The special ids: Marian starts decoding from `decoder_start_token_id` (its pad id)
    and ends at `eos_token_id`. `special_ids` gives them as models/seq2seq_decoding.py's
    `translate` takes them (bos_id, eos_id, pad_id).

Dropout: ours drops the embeddings, the attention probabilities and each sublayer's output
at one `dropout_rate`; Marian drops the same places at `dropout` and `attention_dropout`
and can also drop the MLP's hidden activation (`activation_dropout`), which ours cannot.
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

from hf import io as hf_io
from hf.bert import COPY, LINEAR, OUT, QKV, QKV_BIAS, Table
from hf.bert import read_groups, write_groups
from models import encoder_decoder
from models import positions

MODEL_TYPE = 'marian'
# HF's activation_function <-> ours. HF 'gelu' is the exact erf GELU; 'gelu_new' the tanh
# one; 'swish' (the opus-mt models') is SiLU.
_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
_HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'swish'}
# What HF's Marian is, whatever a config of ours may default to.
_MARIAN = dict(norm_position='post', norm='layer', norm_epsilon=1e-5, use_bias=True,
               attention='scaled_dot', position='sinusoidal', sinusoid_scale=1.0,
               sinusoid_layout='concatenated', mask='causal', encoder_mask='bidirectional',
               share_embeddings=True, tie_output=True)
_INIT_ONLY = ('scale_residual_init',)  # how weights start, not the architecture
# The frozen sinusoid tables and the logits' bias: not parameters of ours.
POSITION_TABLES = ('model.encoder.embed_positions.weight',
                   'model.decoder.embed_positions.weight')
FINAL_LOGITS_BIAS = 'final_logits_bias'
# Copies of the shared table under other names (state_dict() has them all).
_TIED = ('model.encoder.embed_tokens.weight', 'model.decoder.embed_tokens.weight',
         'lm_head.weight')
_SHARED = 'model.shared.weight'


# ------------------------------------------------------------------------------- config


def _reject(field: str, value: Any, why: str):
  raise ValueError(f'HF config {field}={value!r}: {why}')


def _as_dict(hf_config) -> dict[str, Any]:
  return hf_config.to_dict() if hasattr(hf_config, 'to_dict') else dict(hf_config)


def config_fields(hf_config) -> dict[str, Any]:
  """EncoderDecoderConfig fields (`EncoderDecoderConfig(**fields)`) of a Marian config
  (a config.json dict or a `transformers.MarianConfig`)."""
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
  for flag in ('share_encoder_decoder_embeddings', 'tie_word_embeddings'):
    if not hf.get(flag, True):
      _reject(flag, hf[flag], 'one table for source, target and output is all we map')
  vocab = hf['vocab_size']
  if hf.get('decoder_vocab_size') not in (None, vocab):
    _reject('decoder_vocab_size', hf['decoder_vocab_size'],
            f'one joint vocabulary: it must equal vocab_size={vocab}')
  for field in ('encoder_layerdrop', 'decoder_layerdrop', 'activation_dropout'):
    if hf.get(field, 0.0):
      _reject(field, hf[field], 'ours has no such dropout (0 only)')
  dropout = float(hf.get('dropout', 0.1))
  if float(hf.get('attention_dropout', 0.0)) != dropout:
    _reject('attention_dropout', hf.get('attention_dropout', 0.0),
            f'ours drops attention probabilities at its one dropout_rate, and '
            f'dropout={dropout!r} differs (set both alike; at inference neither matters)')
  if not hf.get('is_encoder_decoder', True) or hf.get('is_decoder', False):
    _reject('is_encoder_decoder', hf.get('is_encoder_decoder'), 'MarianMTModel only')
  return dict(
      vocab_size=vocab, max_len=hf['max_position_embeddings'],
      num_layers=hf['encoder_layers'], num_decoder_layers=hf['decoder_layers'],
      num_heads=hf['encoder_attention_heads'], embed_dim=hf['d_model'],
      mlp_dim=hf['encoder_ffn_dim'], activation=_ACTIVATIONS[act],
      scale_embeddings=bool(hf.get('scale_embedding', False)),
      init_stddev=float(hf.get('init_std', 0.02)), dropout_rate=dropout,
      scale_residual_init=False, **_MARIAN)


def special_ids(hf_config) -> dict[str, int]:
  """`translate`'s bos_id, eos_id, pad_id: Marian decodes from decoder_start_token_id."""
  hf = _as_dict(hf_config)
  eos = hf['eos_token_id']
  if not isinstance(eos, int):
    _reject('eos_token_id', eos, 'one end token is all translate takes')
  start = hf.get('decoder_start_token_id')
  return dict(bos_id=hf['pad_token_id'] if start is None else start, eos_id=eos,
              pad_id=hf['pad_token_id'])


def config_to_hf(cfg: encoder_decoder.EncoderDecoderConfig, *, bos_id: int, eos_id: int,
                 pad_id: int) -> dict[str, Any]:
  """The config.json of `cfg` for transformers' MarianMTModel, decoding from `bos_id`
  (decoder_start_token_id) to `eos_id`, with no forced EOS (ours forces none)."""
  for field, value in _MARIAN.items():
    if getattr(cfg, field) != value:
      raise ValueError(f'EncoderDecoderConfig.{field}={getattr(cfg, field)!r}: HF Marian '
                       f'needs {value!r}')
  if cfg.activation not in _HF_ACTIVATIONS:
    raise ValueError(f'EncoderDecoderConfig.activation={cfg.activation!r}: HF Marian has '
                     f'none of it (one of {sorted(_HF_ACTIVATIONS)})')
  decoder_layers = cfg.num_decoder_layers or cfg.num_layers
  return dict(
      architectures=['MarianMTModel'], model_type=MODEL_TYPE, is_encoder_decoder=True,
      vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size,
      max_position_embeddings=cfg.max_len, d_model=cfg.embed_dim,
      encoder_layers=cfg.num_layers, decoder_layers=decoder_layers,
      encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
      encoder_ffn_dim=cfg.mlp_dim, decoder_ffn_dim=cfg.mlp_dim,
      activation_function=_HF_ACTIVATIONS[cfg.activation],
      scale_embedding=cfg.scale_embeddings, init_std=cfg.init_stddev,
      dropout=cfg.dropout_rate, attention_dropout=cfg.dropout_rate, activation_dropout=0.0,
      encoder_layerdrop=0.0, decoder_layerdrop=0.0,
      share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
      pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=bos_id,
      forced_eos_token_id=None, bos_token_id=None, dtype=cfg.param_dtype)


# ---------------------------------------------------------------------------- name map


def _attention(ours: str, hf: str) -> Table:
  table = []
  for name, proj in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    table += [(f'{ours}/{name}/kernel', f'{hf}.{proj}.weight', QKV),
              (f'{ours}/{name}/bias', f'{hf}.{proj}.bias', QKV_BIAS)]
  return table + [(f'{ours}/out/kernel', f'{hf}.out_proj.weight', OUT),
                  (f'{ours}/out/bias', f'{hf}.out_proj.bias', COPY)]


def _norm(ours: str, hf: str) -> Table:
  return [(f'{ours}/scale', f'{hf}.weight', COPY), (f'{ours}/bias', f'{hf}.bias', COPY)]


def _mlp(ours: str, hf: str) -> Table:
  return [(f'{ours}/fc_in/kernel', f'{hf}.fc1.weight', LINEAR),
          (f'{ours}/fc_in/bias', f'{hf}.fc1.bias', COPY),
          (f'{ours}/fc_out/kernel', f'{hf}.fc2.weight', LINEAR),
          (f'{ours}/fc_out/bias', f'{hf}.fc2.bias', COPY)]


def table(cfg: encoder_decoder.EncoderDecoderConfig) -> Table:
  """(our unrolled path, HF name, reshape) of every parameter."""
  rows = [('token_embed/embedding', _SHARED, COPY)]
  for i in range(cfg.num_layers):
    ours, hf = f'encoder/stack/block_{i}', f'model.encoder.layers.{i}'
    rows += _attention(f'{ours}/attention', f'{hf}.self_attn')
    rows += _norm(f'{ours}/ln_attention', f'{hf}.self_attn_layer_norm')
    rows += _mlp(f'{ours}/mlp', hf) + _norm(f'{ours}/ln_mlp', f'{hf}.final_layer_norm')
  for i in range(cfg.num_decoder_layers or cfg.num_layers):
    ours, hf = f'decoder/stack/block_{i}', f'model.decoder.layers.{i}'
    rows += _attention(f'{ours}/attention', f'{hf}.self_attn')
    rows += _norm(f'{ours}/ln_attention', f'{hf}.self_attn_layer_norm')
    rows += _attention(f'{ours}/cross_attention', f'{hf}.encoder_attn')
    rows += _norm(f'{ours}/ln_cross', f'{hf}.encoder_attn_layer_norm')
    rows += _mlp(f'{ours}/mlp', hf) + _norm(f'{ours}/ln_mlp', f'{hf}.final_layer_norm')
  return rows


# -------------------------------------------------------------------------- layouts


def _stacks(params: dict):
  return [(side, params[side]['stack']) for side in ('encoder', 'decoder')]


def stack_layers(params: dict) -> dict:
  """Unrolled {encoder,decoder}/stack/block_i/... -> scanned .../stack/blocks/... (a
  leading layers axis)."""
  params = dict(params)
  for side, stack in _stacks(params):
    blocks = [stack[f'block_{i}'] for i in range(len(stack))]
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
    params[side] = {**params[side], 'stack': {'blocks': stacked}}
  return params


def unstack_layers(params: dict) -> dict:
  """Scanned .../stack/blocks/... -> unrolled .../stack/block_i/... (no-op if unrolled)."""
  params = dict(params)
  for side, stack in _stacks(params):
    if 'blocks' not in stack:
      continue
    num_layers = jax.tree.leaves(stack['blocks'])[0].shape[0]
    params[side] = {**params[side], 'stack': {
        f'block_{i}': jax.tree.map(lambda x, i=i: np.asarray(x)[i], stack['blocks'])
        for i in range(num_layers)}}
  return params


# ------------------------------------------------------------------------------ params


def expected_shapes(cfg: encoder_decoder.EncoderDecoderConfig
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """Our unrolled param tree's shapes, flat by '/'-joined path."""
  model = encoder_decoder.EncoderDecoder(dataclasses.replace(cfg, scan_layers=False))
  tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree)['params'], sep='/')


def _sinusoids(cfg: encoder_decoder.EncoderDecoderConfig, length: int) -> np.ndarray:
  """Our position embeddings at positions 0..length-1: `[length, D]`."""
  pe_LD = positions.sinusoidal(jnp.arange(length)[None], cfg.embed_dim,
                               layout=cfg.sinusoid_layout)[0]
  return np.asarray(pe_LD) * cfg.sinusoid_scale


def _check_not_parameters(hf: Mapping[str, np.ndarray], cfg) -> None:
  """final_logits_bias must be zero and the position tables our sinusoids."""
  if FINAL_LOGITS_BIAS in hf:
    bias = np.asarray(hf[FINAL_LOGITS_BIAS])
    if bias.shape != (1, cfg.vocab_size) or np.any(bias != 0):
      raise ValueError(f'HF {FINAL_LOGITS_BIAS} (shape {bias.shape}, largest '
                       f'{np.abs(bias).max(initial=0):.3g}) must be zeros [1, '
                       f'{cfg.vocab_size}]: our output projection has no bias')
  for name in POSITION_TABLES:
    if name in hf:
      table_LD = np.asarray(hf[name], np.float32)
      # HF computes them in float64 and rounds; ours in float32: a few ulps of the angle.
      ok = (table_LD.shape == (cfg.max_len, cfg.embed_dim) and
            np.allclose(table_LD, _sinusoids(cfg, cfg.max_len), rtol=0, atol=1e-4))
      if not ok:
        raise ValueError(f'HF {name} {table_LD.shape} is not the {cfg.sinusoid_layout} '
                         f'unit sinusoids [{cfg.max_len}, {cfg.embed_dim}] our config gives')


def params_from_hf(state: Mapping[str, np.ndarray],
                   cfg: encoder_decoder.EncoderDecoderConfig) -> dict:
  """Our param tree (scanned if `cfg.scan_layers`) from a MarianMTModel (or bare
  MarianModel) state dict of numpy arrays.

  Raises ValueError for unexpected or missing names, tied copies that differ from
  model.shared.weight, a nonzero final_logits_bias, position tables that are not our
  sinusoids, and shapes that do not fit `cfg`.
  """
  # A bare MarianModel names its parameters without the 'model.' prefix.
  original = {}
  for name in state:
    canonical = (name if name.startswith('model.') or name in (FINAL_LOGITS_BIAS,
                                                                'lm_head.weight')
                 else 'model.' + name)
    original[canonical] = name
  hf = {canonical: state[name] for canonical, name in original.items()}
  if _SHARED not in hf:  # Tied copies only (a save that kept another name of the table).
    for name in _TIED:
      if name in hf:
        hf[_SHARED], original[_SHARED] = hf[name], original[name]
        break
  rows = table(cfg)
  known = {hf_name for _, hf_name, _ in rows} | set(_TIED) | set(POSITION_TABLES) | {
      FINAL_LOGITS_BIAS}
  unexpected = sorted(original[n] for n in hf if n not in known)
  if unexpected:
    raise ValueError(f'unexpected HF parameters for marian (not in our name map): '
                     f'{unexpected}')
  for name in _TIED:
    if name in hf and _SHARED in hf and not np.array_equal(hf[name], hf[_SHARED]):
      raise ValueError(f'HF {original[name]} differs from {original[_SHARED]}: ours has '
                       'one table for source, target and output')
  _check_not_parameters(hf, cfg)
  shapes = expected_shapes(cfg)
  flat, _ = read_groups(hf, {'body': rows}, cfg, original, shapes)
  flat = {k: np.ascontiguousarray(v, dtype=shapes[k].dtype) for k, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  return stack_layers(params) if cfg.scan_layers else params


def params_to_hf(params: Mapping[str, Any],
                 cfg: encoder_decoder.EncoderDecoderConfig) -> dict[str, np.ndarray]:
  """The MarianMTModel state dict (numpy, contiguous) of our param tree, unrolled or
  scanned, with a zero final_logits_bias (as save_pretrained writes: no tied copies, no
  position tables)."""
  params = unstack_layers(jax.tree.map(np.asarray, flax.core.meta.unbox(dict(params))))
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  state = write_groups(flat, {'body': table(cfg)}, cfg)
  dtype = flat['token_embed/embedding'].dtype
  state[FINAL_LOGITS_BIAS] = np.zeros((1, cfg.vocab_size), dtype)
  return state


# -------------------------------------------------------------------------- directories


def load_hf_dir(directory: str | os.PathLike, *, scan_layers: bool = False
                ) -> tuple[dict[str, Any], dict, dict[str, int]]:
  """(our config fields, our params, translate's special ids) of a MarianMTModel
  directory (config.json + model.safetensors; pickles are refused)."""
  hf_config = hf_io.read_config(directory)
  fields = {**config_fields(hf_config), 'scan_layers': scan_layers}
  params = params_from_hf(hf_io.read_safetensors(directory),
                          encoder_decoder.EncoderDecoderConfig(**fields))
  return fields, params, special_ids(hf_config)


def save_hf_dir(directory: str | os.PathLike, cfg: encoder_decoder.EncoderDecoderConfig,
                params: Mapping[str, Any], *, bos_id: int, eos_id: int,
                pad_id: int) -> list[pathlib.Path]:
  """Writes config.json + model.safetensors that `MarianMTModel.from_pretrained` loads
  offline; returns the paths."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  weights = directory / hf_io.WEIGHTS
  # transformers checks the 'format' metadata; 'pt' says the names are PyTorch's.
  safetensors.numpy.save_file(params_to_hf(params, cfg), os.fspath(weights),
                              metadata={'format': 'pt'})
  config_path = directory / hf_io.CONFIG
  config_path.write_text(json.dumps(hf_config, indent=2) + '\n', encoding='utf-8')
  return [config_path, weights]
