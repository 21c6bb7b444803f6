"""T5 (transformers' T5ForConditionalGeneration, v1.0 and v1.1) <-> our encoder-decoder
(models/encoder_decoder.py).

The same two maps as hf/marian.py, with hf/bert.py's reshapes:
  * the config: an HF config.json dict (or a `T5Config`) <-> `EncoderDecoderConfig` fields
    (`config_fields`, `config_to_hf`), refusing with the field's name whatever our model
    cannot represent;
  * the parameters: an HF state dict of numpy arrays <-> our param tree (`params_from_hf`,
    `params_to_hf`), from one table of (our path, HF name, reshape).

T5 is our stacks configured so: pre-norm blocks with RMSNorm (`layer_norm_epsilon`) and a
final norm per stack, no biases anywhere, attention q·k without the 1/sqrt(H) (`'dot'`;
T5 folds it into the initialisation), no position embeddings at the input but a learned
bias per relative-distance bucket and head, one table per stack (`position='t5'`): HF
keeps it in block 0's self-attention of each stack and hands block 0's bias to the other
layers; ours is the stack's `relative_bias`, computed once, bidirectional in the encoder
and causal in the decoder. One token table for source and target, not scaled on input.
  * v1.0 (`feed_forward_proj='relu'`, tied output): the lm_head is the token table, read
    after the decoder's output is multiplied by d_model**-0.5 (`scale_tied_output`).
  * v1.1 (`'gated-gelu'`, `tie_word_embeddings=False`): a gated MLP, act(x·wi_0) * (x·wi_1)
    with the tanh GELU (transformers maps 'gated-gelu' to gelu_new), so wi_0 is our
    `fc_in` and wi_1 our linear `fc_gate`; a separate, unscaled lm_head (our `output`).

Which of the two outputs: transformers 5 forces `T5Config.tie_word_embeddings=True` and
keeps the old flag as `scale_decoder_outputs` (config.json holds both); its lm_head is
untied only when a checkpoint holds an lm_head.weight that differs from shared.weight.
Here the scaling decides: `scale_decoder_outputs` when present, else
`tie_word_embeddings` (transformers 4's config.json). Scaled: tied, and an lm_head.weight
that differs is refused (ours cannot scale an untied output); unscaled: our own `output`
kernel, lm_head.weight, or the token table where a checkpoint has none (transformers ties
it then).

Not in our config:
  * `max_len`: T5 has no position table (relative buckets work at any length), so it
    bounds nothing our model computes with position='t5'. `config_fields` takes it as an
    argument, 512 by default: the input length T5 was pretrained with, the nominal row
    length for data pipelines that read it.
  * Dropout: ours drops the embeddings, the attention probabilities and each sublayer's
    output at `dropout_rate`; T5 also drops the MLP's hidden activation and each stack's
    output after its final norm. Same at inference; training differs slightly.
  * `initializer_factor` and T5's per-matrix initial scales: how weights start, not the
    architecture (an export writes initializer_factor=1.0).
  * The special ids: T5 starts decoding from `decoder_start_token_id` (its pad id, 0) and
    ends at `eos_token_id` (1). `special_ids` gives them as models/seq2seq_decoding.py's
    `translate` takes them (bos_id, eos_id, pad_id).
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
from hf.bert import COPY, LINEAR, OUT, QKV, Table
from hf.bert import read_groups, write_groups
from models import encoder_decoder
from models import layers

MODEL_TYPE = 't5'
# HF's feed_forward_proj ('ACT' or 'gated-ACT', ACT a name in transformers' ACT2FN) <->
# ours. HF 'gelu' is the exact erf GELU, but 'gated-gelu' the tanh one (gelu_new):
# transformers maps it so for T5 v1.1's sake.
_ACTIVATIONS = {'relu': 'relu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
                'gelu_pytorch_tanh': 'gelu_tanh', 'silu': 'silu', 'swish': 'silu',
                'gated-gelu': 'geglu_tanh', 'gated-gelu_new': 'geglu_tanh',
                'gated-gelu_pytorch_tanh': 'geglu_tanh', 'gated-relu': 'reglu',
                'gated-silu': 'swiglu', 'gated-swish': 'swiglu'}
_HF_ACTIVATIONS = {'relu': 'relu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'silu': 'silu',
                   'geglu_tanh': 'gated-gelu', 'reglu': 'gated-relu', 'swiglu': 'gated-silu'}
# What HF's T5 is, whatever a config of ours may default to.
_T5 = dict(norm_position='pre', norm='rms', use_bias=False, attention='dot', position='t5',
           mask='causal', encoder_mask='bidirectional', share_embeddings=True,
           scale_embeddings=False, embed_norm=False)
_SHARED = 'shared.weight'
_LM_HEAD = 'lm_head.weight'
# Copies of the shared table under other names (state_dict() has them all).
_TIED = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
# Old checkpoints carry a relative bias in the decoder's first cross-attention, which T5
# never uses (transformers ignores it on load too): accepted and dropped.
_UNUSED = ('decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)


# ------------------------------------------------------------------------------- config


def _reject(field: str, value: Any, why: str):
  raise ValueError(f'HF config {field}={value!r}: {why}')


def _as_dict(hf_config) -> dict[str, Any]:
  return hf_config.to_dict() if hasattr(hf_config, 'to_dict') else dict(hf_config)


def _scales_output(hf: Mapping[str, Any]) -> bool:
  """Whether HF multiplies the decoder's output by d_model**-0.5 before the lm_head (see
  the module docstring: transformers 5's flag, else transformers 4's)."""
  scale = hf.get('scale_decoder_outputs')
  return bool(hf.get('tie_word_embeddings', True) if scale is None else scale)


def config_fields(hf_config, max_len: int = 512) -> dict[str, Any]:
  """EncoderDecoderConfig fields (`EncoderDecoderConfig(**fields)`) of a T5 config (a
  config.json dict or a `transformers.T5Config`); `max_len` as the module docstring says."""
  hf = _as_dict(hf_config)
  if hf.get('model_type') != MODEL_TYPE:
    _reject('model_type', hf.get('model_type'), f'not {MODEL_TYPE!r}')
  proj = hf.get('feed_forward_proj', 'relu')
  if proj not in _ACTIVATIONS:
    _reject('feed_forward_proj', proj, f'not one of {sorted(_ACTIVATIONS)}')
  d_model, heads, d_kv = hf['d_model'], hf['num_heads'], hf['d_kv']
  if heads * d_kv != d_model:
    _reject('d_kv', d_kv, f'our heads split the width: num_heads={heads} x d_kv must equal '
            f'd_model={d_model}')
  buckets = hf.get('relative_attention_num_buckets', 32)
  if buckets < 4:
    _reject('relative_attention_num_buckets', buckets, 'ours needs >= 4 (half exact, half '
            'log-spaced, per direction)')
  for flag, wanted in (('is_encoder_decoder', True), ('is_decoder', False)):
    if bool(hf.get(flag, wanted)) != wanted:
      _reject(flag, hf[flag], 'T5ForConditionalGeneration only')
  scaled = _scales_output(hf)
  return dict(
      vocab_size=hf['vocab_size'], max_len=max_len, num_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
      num_heads=heads, embed_dim=d_model, mlp_dim=hf['d_ff'], activation=_ACTIVATIONS[proj],
      norm_epsilon=float(hf.get('layer_norm_epsilon', 1e-6)), relative_buckets=buckets,
      relative_max_distance=hf.get('relative_attention_max_distance', 128),
      dropout_rate=float(hf.get('dropout_rate', 0.1)), tie_output=scaled,
      scale_tied_output=scaled, scale_residual_init=False, **_T5)


def special_ids(hf_config) -> dict[str, int]:
  """`translate`'s bos_id, eos_id, pad_id: T5 decodes from decoder_start_token_id (pad)."""
  hf = _as_dict(hf_config)
  eos = hf.get('eos_token_id', 1)
  if not isinstance(eos, int):
    _reject('eos_token_id', eos, 'one end token is all translate takes')
  pad = hf.get('pad_token_id', 0)
  start = hf.get('decoder_start_token_id')
  return dict(bos_id=pad if start is None else start, eos_id=eos, pad_id=pad)


def config_to_hf(cfg: encoder_decoder.EncoderDecoderConfig, *, bos_id: int = 0,
                 eos_id: int = 1, pad_id: int = 0) -> dict[str, Any]:
  """The config.json of `cfg` for transformers' T5ForConditionalGeneration (either
  version), decoding from `bos_id` (decoder_start_token_id) to `eos_id`; T5's by default."""
  for field, value in _T5.items():
    if getattr(cfg, field) != value:
      raise ValueError(f'EncoderDecoderConfig.{field}={getattr(cfg, field)!r}: HF T5 '
                       f'needs {value!r}')
  if cfg.activation not in _HF_ACTIVATIONS:
    raise ValueError(f'EncoderDecoderConfig.activation={cfg.activation!r}: HF T5 has none '
                     f'of it (one of {sorted(_HF_ACTIVATIONS)})')
  if cfg.tie_output != cfg.scale_tied_output:
    raise ValueError(f'EncoderDecoderConfig.scale_tied_output={cfg.scale_tied_output!r} '
                     f'with tie_output={cfg.tie_output!r}: HF T5 ties its lm_head exactly '
                     'when it scales the decoder output (v1.0), else neither (v1.1)')
  return dict(
      architectures=['T5ForConditionalGeneration'], model_type=MODEL_TYPE,
      is_encoder_decoder=True, vocab_size=cfg.vocab_size, d_model=cfg.embed_dim,
      d_kv=cfg.head_dim, d_ff=cfg.mlp_dim, num_layers=cfg.num_layers,
      num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance,
      feed_forward_proj=_HF_ACTIVATIONS[cfg.activation], layer_norm_epsilon=cfg.norm_epsilon,
      dropout_rate=cfg.dropout_rate, initializer_factor=1.0,
      # Both flags: transformers 4 reads the first, 5 the second (module docstring).
      tie_word_embeddings=cfg.tie_output, scale_decoder_outputs=cfg.scale_tied_output,
      pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=bos_id,
      use_cache=True, dtype=cfg.param_dtype)


# ---------------------------------------------------------------------------- name map


def _attention(ours: str, hf: str) -> Table:
  rows = [(f'{ours}/{name}/kernel', f'{hf}.{proj}.weight', QKV)
          for name, proj in (('query', 'q'), ('key', 'k'), ('value', 'v'))]
  return rows + [(f'{ours}/out/kernel', f'{hf}.o.weight', OUT)]


def _norm(ours: str, hf: str) -> Table:
  return [(f'{ours}/scale', f'{hf}.weight', COPY)]


def _mlp(ours: str, hf: str, gated: bool) -> Table:
  # Gated: wi_0 goes through the activation (our fc_in), wi_1 is the linear gate.
  inputs = ([('fc_in', 'wi_0'), ('fc_gate', 'wi_1')] if gated else [('fc_in', 'wi')])
  return [(f'{ours}/{name}/kernel', f'{hf}.DenseReluDense.{proj}.weight', LINEAR)
          for name, proj in inputs + [('fc_out', 'wo')]]


def table(cfg: encoder_decoder.EncoderDecoderConfig) -> Table:
  """(our unrolled path, HF name, reshape) of every parameter."""
  gated = layers.is_gated(cfg.activation)
  rows = [('token_embed/embedding', _SHARED, COPY)]
  layer_counts = (('encoder', cfg.num_layers),
                  ('decoder', cfg.num_decoder_layers or cfg.num_layers))
  for side, num_layers in layer_counts:
    rows.append((f'{side}/stack/relative_bias/embedding',
                 f'{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', COPY))
    for i in range(num_layers):
      ours, hf = f'{side}/stack/block_{i}', f'{side}.block.{i}.layer'
      rows += _attention(f'{ours}/attention', f'{hf}.0.SelfAttention')
      rows += _norm(f'{ours}/ln_attention', f'{hf}.0.layer_norm')
      mlp = 1
      if side == 'decoder':
        rows += _attention(f'{ours}/cross_attention', f'{hf}.1.EncDecAttention')
        rows += _norm(f'{ours}/ln_cross', f'{hf}.1.layer_norm')
        mlp = 2
      rows += _mlp(f'{ours}/mlp', f'{hf}.{mlp}', gated)
      rows += _norm(f'{ours}/ln_mlp', f'{hf}.{mlp}.layer_norm')
    rows += _norm(f'{side}/stack/ln_final', f'{side}.final_layer_norm')
  if not cfg.tie_output:
    rows.append(('decoder/output/kernel', _LM_HEAD, LINEAR))
  return rows


# -------------------------------------------------------------------------- layouts


def stack_layers(params: dict) -> dict:
  """Unrolled {encoder,decoder}/stack/block_i/... -> scanned .../stack/blocks/... (a
  leading layers axis); the stack's own parameters (relative_bias, ln_final) stay."""
  params = dict(params)
  for side in ('encoder', 'decoder'):
    stack = dict(params[side]['stack'])
    names = sorted((k for k in stack if k.startswith('block_')), key=lambda k: int(k[6:]))
    blocks = [stack.pop(name) for name in names]
    stack['blocks'] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
    params[side] = {**params[side], 'stack': stack}
  return params


def unstack_layers(params: dict) -> dict:
  """Scanned .../stack/blocks/... -> unrolled .../stack/block_i/... (no-op if unrolled)."""
  params = dict(params)
  for side in ('encoder', 'decoder'):
    stack = dict(params[side]['stack'])
    if 'blocks' not in stack:
      continue
    blocks = stack.pop('blocks')
    num_layers = jax.tree.leaves(blocks)[0].shape[0]
    stack.update({f'block_{i}': jax.tree.map(lambda x, i=i: np.asarray(x)[i], blocks)
                  for i in range(num_layers)})
    params[side] = {**params[side], 'stack': stack}
  return params


# ------------------------------------------------------------------------------ params


def expected_shapes(cfg: encoder_decoder.EncoderDecoderConfig
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """Our unrolled param tree's shapes, flat by '/'-joined path."""
  model = encoder_decoder.EncoderDecoder(dataclasses.replace(cfg, scan_layers=False))
  tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree)['params'], sep='/')


def params_from_hf(state: Mapping[str, np.ndarray], cfg: encoder_decoder.EncoderDecoderConfig,
                   *, scan_layers: bool | None = None) -> dict:
  """Our param tree from a T5ForConditionalGeneration (or bare T5Model) state dict of
  numpy arrays: scanned if `scan_layers` (None: as `cfg.scan_layers`).

  Raises ValueError for unexpected or missing names, embed_tokens copies that differ from
  shared.weight, a scaled (tied) model whose lm_head.weight differs from it, and shapes
  that do not fit `cfg`.
  """
  hf = dict(state)
  if _SHARED not in hf:  # Tied copies only (a save that kept another name of the table).
    for name in _TIED:
      if name in hf:
        hf[_SHARED] = hf[name]
        break
  rows = table(cfg)
  known = {hf_name for _, hf_name, _ in rows} | set(_TIED) | set(_UNUSED) | {_LM_HEAD}
  unexpected = sorted(n for n in hf if n not in known)
  if unexpected:
    raise ValueError(f'unexpected HF parameters for t5 (not in our name map): {unexpected}')
  copies = _TIED + ((_LM_HEAD,) if cfg.tie_output else ())
  for name in copies:
    if name in hf and _SHARED in hf and not np.array_equal(hf[name], hf[_SHARED]):
      why = ('one token table for source and target' if name in _TIED else
             'this config scales the decoder output (v1.0), which ours does only for the '
             'tied table; an lm_head of its own is v1.1 (unscaled)')
      raise ValueError(f'HF {name} differs from {_SHARED}: {why}')
  if not cfg.tie_output and _LM_HEAD not in hf and _SHARED in hf:
    hf[_LM_HEAD] = hf[_SHARED]  # transformers ties a missing lm_head to the table too
  shapes = expected_shapes(cfg)
  flat, _ = read_groups(hf, {'body': rows}, cfg, {n: n for n in hf}, shapes)
  flat = {k: np.ascontiguousarray(v, dtype=shapes[k].dtype) for k, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  scan = cfg.scan_layers if scan_layers is None else scan_layers
  return stack_layers(params) if scan else params


def params_to_hf(params: Mapping[str, Any],
                 cfg: encoder_decoder.EncoderDecoderConfig) -> dict[str, np.ndarray]:
  """The T5ForConditionalGeneration state dict (numpy, contiguous) of our param tree,
  unrolled or scanned, as save_pretrained writes it: no embed_tokens copies, and an
  lm_head.weight only when it is not the table (v1.1)."""
  params = unstack_layers(jax.tree.map(np.asarray, flax.core.meta.unbox(dict(params))))
  return write_groups(flax.traverse_util.flatten_dict(params, sep='/'), {'body': table(cfg)},
                      cfg)


# -------------------------------------------------------------------------- directories


def load_hf_dir(directory: str | os.PathLike, *, scan_layers: bool = False,
                max_len: int = 512) -> tuple[dict[str, Any], dict, dict[str, int]]:
  """(our config fields, our params, translate's special ids) of a
  T5ForConditionalGeneration directory (config.json + model.safetensors; pickles are
  refused)."""
  hf_config = hf_io.read_config(directory)
  fields = {**config_fields(hf_config, max_len), 'scan_layers': scan_layers}
  params = params_from_hf(hf_io.read_safetensors(directory),
                          encoder_decoder.EncoderDecoderConfig(**fields))
  return fields, params, special_ids(hf_config)


def save_hf_dir(directory: str | os.PathLike, cfg: encoder_decoder.EncoderDecoderConfig,
                params: Mapping[str, Any], *, bos_id: int = 0, eos_id: int = 1,
                pad_id: int = 0) -> list[pathlib.Path]:
  """Writes config.json + model.safetensors that `T5ForConditionalGeneration
  .from_pretrained` loads offline; returns the paths."""
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
