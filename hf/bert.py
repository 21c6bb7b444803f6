"""BERT and RoBERTa <-> Hugging Face `transformers` (BertModel, BertForPreTraining,
BertForMaskedLM, RobertaModel, RobertaForMaskedLM).

Two maps, each read top to bottom:
  * the config: an HF config.json dict <-> `BertConfig` fields (`config_from_hf`,
    `config_to_hf`), refusing with the field's name whatever our model cannot represent;
  * the parameters: an HF state dict of numpy arrays <-> our param tree (`params_from_hf`,
    `params_to_hf`), from one table of (our path, HF name, reshape) per family.

HF stores a Linear's weight [out, in]; we store kernels [in, out], attention's q/k/v split
by heads ([D, N, H], bias [N, H]) and its output projection [N, H, D]. Every reshape is a
transpose and a reshape, so import -> export gives back the same bytes.

Our model picks the family from `position_offset`: 0 is BERT, > 0 RoBERTa (its positions
start at pad_token_id + 1). HF's body names carry the family's prefix ('bert.', 'roberta.')
in its *For*Training/MaskedLM checkpoints and none in a bare BertModel's (MiniLM's); the
heads ('cls.', 'lm_head.') live at the top.
"""

import dataclasses
from typing import Any, Callable, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from models import bert

# HF's hidden_act <-> our activation. HF 'gelu' is the exact erf GELU; 'gelu_new' and
# 'gelu_pytorch_tanh' are both the tanh approximation (we export it as 'gelu_new').
_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
_HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'silu'}
MODEL_TYPES = ('bert', 'roberta')
# What HF's BERT/RoBERTa block is, whatever a config of ours may default to.
_HF_BLOCK = dict(norm_position='post', norm='layer', use_bias=True, attention='scaled_dot',
                 position='learned', mask='bidirectional', scale_residual_init=False,
                 embedding_size=0, mlm_head=True)


def model_type_of(cfg: bert.BertConfig) -> str:
  """'roberta' when positions are offset (RoBERTa numbers them from pad + 1), else 'bert'."""
  return 'roberta' if cfg.position_offset > 0 else 'bert'


# ------------------------------------------------------------------------------- config


def _reject(field: str, value: Any, why: str):
  raise ValueError(f'HF config {field}={value!r}: {why}')


def config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """BertConfig fields (`BertConfig(**fields)`) of an HF BERT/RoBERTa config.json dict."""
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    _reject('model_type', model_type, f'not one of {MODEL_TYPES}')
  act = hf.get('hidden_act', 'gelu')
  if act not in _ACTIVATIONS:
    _reject('hidden_act', act, f'not one of {sorted(_ACTIVATIONS)}')
  if model_type == 'roberta' and _ACTIVATIONS[act] != 'gelu':
    # RoBERTa's lm_head applies the exact GELU whatever hidden_act says; ours uses one.
    _reject('hidden_act', act, "RoBERTa's MLM head always uses exact gelu and ours uses "
            'the encoder activation, so only gelu is representable')
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    _reject('position_embedding_type', hf['position_embedding_type'],
            'only absolute (learned) positions are mapped')
  for flag in ('is_decoder', 'add_cross_attention'):
    if hf.get(flag, False):
      _reject(flag, hf[flag], 'an encoder without cross-attention is all we map')
  if not hf.get('tie_word_embeddings', True):
    _reject('tie_word_embeddings', False, 'our MLM head is tied to the token embeddings')
  dropout = hf.get('hidden_dropout_prob', 0.1)
  if hf.get('attention_probs_dropout_prob', dropout) != dropout:
    _reject('attention_probs_dropout_prob', hf['attention_probs_dropout_prob'],
            f'we have one dropout_rate, and hidden_dropout_prob={dropout!r} differs')
  fields = dict(
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      embed_dim=hf['hidden_size'], mlp_dim=hf['intermediate_size'],
      vocab_size=hf['vocab_size'], max_len=hf['max_position_embeddings'],
      type_vocab_size=hf.get('type_vocab_size', 2), activation=_ACTIVATIONS[act],
      norm_epsilon=float(hf.get('layer_norm_eps', 1e-12)),
      init_stddev=float(hf.get('initializer_range', 0.02)), dropout_rate=float(dropout),
      position_offset=0, next_sentence=True, **_HF_BLOCK)
  if model_type == 'roberta':
    pad = hf.get('pad_token_id', 1)
    if not isinstance(pad, int) or pad < 0:
      _reject('pad_token_id', pad, 'RoBERTa positions start at pad_token_id + 1')
    # roberta_preset's differences, with the checkpoint's own epsilon and token types.
    fields.update(position_offset=pad + 1, next_sentence=False)
  return fields


def config_to_hf(cfg: bert.BertConfig) -> dict[str, Any]:
  """The config.json of `cfg` for transformers (BertForPreTraining / *ForMaskedLM)."""
  for field, value in _HF_BLOCK.items():
    if field == 'scale_residual_init':  # an initialisation, not the architecture
      continue
    if getattr(cfg, field) != value:
      raise ValueError(f'BertConfig.{field}={getattr(cfg, field)!r}: HF BERT/RoBERTa '
                       f'needs {value!r}')
  if cfg.activation not in _HF_ACTIVATIONS:
    raise ValueError(f'BertConfig.activation={cfg.activation!r}: HF BERT has none of it '
                     f'(one of {sorted(_HF_ACTIVATIONS)})')
  model_type = model_type_of(cfg)
  if model_type == 'roberta' and cfg.activation != 'gelu':
    raise ValueError(f"BertConfig.activation={cfg.activation!r}: RoBERTa's MLM head in HF "
                     'is always exact gelu')
  if model_type == 'roberta' and cfg.next_sentence:
    raise ValueError('BertConfig.next_sentence=True with position_offset > 0: HF RoBERTa '
                     'has no NSP head')
  if model_type == 'roberta':
    architecture = 'RobertaForMaskedLM'
    special = dict(pad_token_id=cfg.position_offset - 1, bos_token_id=0, eos_token_id=2)
  else:
    architecture = 'BertForPreTraining' if cfg.next_sentence else 'BertForMaskedLM'
    special = dict(pad_token_id=0)
  return dict(
      architectures=[architecture], model_type=model_type,
      hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
      hidden_act=_HF_ACTIVATIONS[cfg.activation], layer_norm_eps=cfg.norm_epsilon,
      max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
      vocab_size=cfg.vocab_size, initializer_range=cfg.init_stddev,
      hidden_dropout_prob=cfg.dropout_rate, attention_probs_dropout_prob=cfg.dropout_rate,
      position_embedding_type='absolute', tie_word_embeddings=True, is_decoder=False,
      dtype=cfg.param_dtype, **special)


# ---------------------------------------------------------------------------- reshapes


@dataclasses.dataclass(frozen=True)
class Reshape:
  """HF array -> ours (`to_ours`) and back (`to_hf`), given the config (for N, H, D)."""
  to_ours: Callable[[np.ndarray, bert.BertConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, bert.BertConfig], np.ndarray]


COPY = Reshape(lambda w, c: w, lambda x, c: x)
# nn.Linear weight [out, in] <-> Dense kernel [in, out].
LINEAR = Reshape(lambda w, c: w.T, lambda x, c: x.T)
# query/key/value: weight [N*H, D] <-> kernel [D, N, H]; bias [N*H] <-> [N, H].
QKV = Reshape(lambda w, c: w.T.reshape(c.embed_dim, c.num_heads, c.head_dim),
              lambda x, c: x.reshape(c.embed_dim, -1).T)
QKV_BIAS = Reshape(lambda w, c: w.reshape(c.num_heads, c.head_dim),
                   lambda x, c: x.reshape(-1))
# attention output: weight [D, N*H] <-> kernel [N, H, D].
OUT = Reshape(lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.embed_dim),
              lambda x, c: x.reshape(-1, c.embed_dim).T)

Table = list[tuple[str, str, Reshape]]  # (our path, HF name, reshape)


def _dense(ours: str, hf: str) -> Table:
  return [(f'{ours}/kernel', f'{hf}.weight', LINEAR), (f'{ours}/bias', f'{hf}.bias', COPY)]


def _norm(ours: str, hf: str) -> Table:
  return [(f'{ours}/scale', f'{hf}.weight', COPY), (f'{ours}/bias', f'{hf}.bias', COPY)]


def _layer_table(i: int, p: str, ours_prefix: str = '') -> Table:
  ours, hf = f'{ours_prefix}encoder/block_{i}', f'{p}encoder.layer.{i}'
  table = []
  for name in ('query', 'key', 'value'):
    table += [(f'{ours}/attention/{name}/kernel', f'{hf}.attention.self.{name}.weight', QKV),
              (f'{ours}/attention/{name}/bias', f'{hf}.attention.self.{name}.bias', QKV_BIAS)]
  table += [(f'{ours}/attention/out/kernel', f'{hf}.attention.output.dense.weight', OUT),
            (f'{ours}/attention/out/bias', f'{hf}.attention.output.dense.bias', COPY)]
  table += _norm(f'{ours}/ln_attention', f'{hf}.attention.output.LayerNorm')
  table += _dense(f'{ours}/mlp/fc_in', f'{hf}.intermediate.dense')
  table += _dense(f'{ours}/mlp/fc_out', f'{hf}.output.dense')
  table += _norm(f'{ours}/ln_mlp', f'{hf}.output.LayerNorm')
  return table


def tables(cfg: bert.BertConfig) -> dict[str, Table]:
  """The name map of `cfg`'s family, by group: 'body' (embeddings and layers, required)
  and the heads 'pooler', 'mlm', 'nsp' (BERT only), which an import may lack."""
  model_type = model_type_of(cfg)
  p = f'{model_type}.'
  body = [('token_embed/embedding', f'{p}embeddings.word_embeddings.weight', COPY),
          ('position_embed/embedding', f'{p}embeddings.position_embeddings.weight', COPY),
          ('type_embed/embedding', f'{p}embeddings.token_type_embeddings.weight', COPY)]
  body += _norm('ln_embed', f'{p}embeddings.LayerNorm')
  for i in range(cfg.num_layers):
    body += _layer_table(i, p)
  groups = {'body': body, 'pooler': _dense('pooler', f'{p}pooler.dense')}
  if model_type == 'bert':
    groups['mlm'] = (_dense('mlm_dense', 'cls.predictions.transform.dense')
                     + _norm('mlm_ln', 'cls.predictions.transform.LayerNorm')
                     + [('mlm_bias', 'cls.predictions.bias', COPY)])
  else:
    groups['mlm'] = (_dense('mlm_dense', 'lm_head.dense') + _norm('mlm_ln', 'lm_head.layer_norm')
                     + [('mlm_bias', 'lm_head.bias', COPY)])
  if cfg.next_sentence:
    groups['nsp'] = _dense('nsp', 'cls.seq_relationship')
  return groups


def _tied(p: str) -> dict[str, str]:
  """HF names that repeat another array (older checkpoints save them): name -> its twin."""
  return {'cls.predictions.decoder.weight': f'{p}embeddings.word_embeddings.weight',
          'cls.predictions.decoder.bias': 'cls.predictions.bias',
          'lm_head.decoder.weight': f'{p}embeddings.word_embeddings.weight',
          'lm_head.decoder.bias': 'lm_head.bias'}


_BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')  # not parameters
_HEAD_PREFIXES = ('cls.', 'lm_head.')


# -------------------------------------------------------------------------- layouts


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled encoder/block_i/... -> scanned encoder/blocks/... with a leading L axis."""
  blocks = [params['encoder'][f'block_{i}'] for i in range(num_layers)]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
  return {**params, 'encoder': {'blocks': stacked}}


def unstack_layers(params: dict) -> dict:
  """Scanned encoder/blocks/... -> unrolled encoder/block_i/... (no-op if unrolled)."""
  if 'blocks' not in params['encoder']:
    return params
  stacked = params['encoder']['blocks']
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  encoder = {f'block_{i}': jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
             for i in range(num_layers)}
  return {**params, 'encoder': encoder}


# ------------------------------------------------------------------------------ params


def expected_shapes(cfg: bert.BertConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Our unrolled param tree's shapes, flat by '/'-joined path."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  tree = jax.eval_shape(bert.BERT(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree)['params'], sep='/')


def fresh_head(path: str, shape: tuple[int, ...], cfg: bert.BertConfig,
               rng: np.random.Generator) -> np.ndarray:
  """A head's parameter as BERT initialises it: kernels N(0, init_stddev), norm scales 1,
  biases 0. (Drawn here, not by initialising the whole model: that took 15 s for MiniLM.)"""
  leaf = path.rsplit('/', 1)[-1]
  if leaf == 'kernel':
    return rng.normal(0.0, cfg.init_stddev, shape)
  return np.ones(shape) if leaf == 'scale' else np.zeros(shape)


def read_groups(hf: Mapping[str, np.ndarray], groups: dict[str, Table], cfg,
                original: Mapping[str, str], shapes: Mapping[str, jax.ShapeDtypeStruct]
                ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Our flat params from the HF arrays, group by group, and the head groups the checkpoint
  lacks entirely (to initialise fresh). The 'body' group is required, and a group present
  in part is an error; so is any array whose shape is not `shapes`' (`original` gives the
  HF name as the checkpoint spells it, for messages)."""
  flat, fresh = {}, []
  for group, table in groups.items():
    present = [hf_name in hf for _, hf_name, _ in table]
    if group != 'body' and not any(present):
      fresh.append(group)
      continue
    missing = [hf_name for (_, hf_name, _), ok in zip(table, present) if not ok]
    if missing:
      raise ValueError(f'HF checkpoint lacks {missing} of its {group!r} parameters')
    for ours, hf_name, reshape in table:
      flat[ours] = reshape.to_ours(np.asarray(hf[hf_name]), cfg)
  wrong = [f'{original[hf_name]} {hf[hf_name].shape} -> {ours} {flat[ours].shape}, '
           f'expected {shapes[ours].shape}'
           for table in groups.values() for ours, hf_name, _ in table
           if ours in flat and flat[ours].shape != shapes[ours].shape]
  if wrong:
    raise ValueError('HF shapes do not fit the config: ' + '; '.join(wrong))
  return flat, fresh


def params_from_hf(state: Mapping[str, np.ndarray], cfg: bert.BertConfig, *,
                   seed: int = 0) -> tuple[dict, tuple[str, ...]]:
  """Our param tree (scanned if `cfg.scan_layers`) from an HF state dict, and the head
  groups ('pooler', 'mlm', 'nsp') it lacked, initialised fresh from `seed`.

  Raises ValueError listing unexpected or missing names, untied decoder weights and
  shapes that do not fit `cfg`.
  """
  p = f'{model_type_of(cfg)}.'
  # A bare BertModel names its body without the prefix: add it, remembering the original.
  original = {}
  for name in state:
    canonical = name if name.startswith((p, *_HEAD_PREFIXES)) else p + name
    original[canonical] = name
  hf = {canonical: state[name] for canonical, name in original.items()}

  groups = tables(cfg)
  known = {hf_name for table in groups.values() for _, hf_name, _ in table}
  tied = _tied(p)
  unexpected = [original[n] for n in hf
                if n not in known and n not in tied and not n.endswith(_BUFFERS)]
  if unexpected:
    raise ValueError(f'unexpected HF parameters for {p[:-1]} (not in our name map): '
                     f'{sorted(unexpected)}')
  for name, twin in tied.items():
    if name in hf and twin in hf and not np.array_equal(hf[name], hf[twin]):
      raise ValueError(f'HF {original[name]} differs from {original[twin]}: our MLM head '
                       'is tied to the token embeddings and cannot hold an untied one')

  shapes = expected_shapes(cfg)
  flat, fresh = read_groups(hf, groups, cfg, original, shapes)
  if fresh:
    logging.info('HF import: no %s in the checkpoint; initialised fresh', fresh)
    rng = np.random.default_rng(seed)
    for group in fresh:
      flat.update({ours: fresh_head(ours, shapes[ours].shape, cfg, rng)
                   for ours, _, _ in groups[group]})
  flat = {k: np.ascontiguousarray(v, dtype=shapes[k].dtype) for k, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  if cfg.scan_layers:
    params = stack_layers(params, cfg.num_layers)
  return params, tuple(fresh)


def params_to_hf(params: Mapping[str, Any], cfg: bert.BertConfig) -> dict[str, np.ndarray]:
  """The HF state dict (numpy, contiguous) of our param tree, unrolled or scanned."""
  params = unstack_layers(jax.tree.map(np.asarray, flax.core.meta.unbox(dict(params))))
  return write_groups(flax.traverse_util.flatten_dict(params, sep='/'), tables(cfg), cfg)


def write_groups(flat: Mapping[str, np.ndarray], groups: dict[str, Table],
                 cfg) -> dict[str, np.ndarray]:
  """The HF state dict of our flat (unrolled) params: every parameter through its group's
  table; a parameter with no HF name, or a table entry with no parameter, is an error."""
  mapped = {ours for table in groups.values() for ours, _, _ in table}
  unmapped = sorted(set(flat) - mapped)
  if unmapped:
    raise ValueError(f'parameters with no HF name: {unmapped}')
  state = {}
  for group, table in groups.items():
    for ours, hf_name, reshape in table:
      if ours not in flat:
        raise ValueError(f'params lack {ours!r} of the {group!r} group')
      state[hf_name] = np.ascontiguousarray(reshape.to_hf(flat[ours], cfg))
  return state
