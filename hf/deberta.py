"""DeBERTa-v2/v3 <-> Hugging Face `transformers` (DebertaV2Model, DebertaV2ForMaskedLM).

The same two maps as hf/bert.py, with its reshapes:
  * the config: an HF config.json dict <-> `DebertaConfig` fields (`config_from_hf`,
    `config_to_hf`), refusing with the field's name whatever our model cannot represent
    (a convolution after the first layer, separate position projections, unbucketed
    relative positions, a factorised embedding, ...);
  * the parameters: an HF state dict of numpy arrays <-> our param tree (`params_from_hf`,
    `params_to_hf`), by group: 'body' (required) and the heads, which an import may lack
    (a bare DebertaV2Model has no MLM head: it comes back fresh).

transformers' DebertaV2ForMaskedLM has two MLM heads that compute the same function under
different names, chosen by its config's `legacy` (default True): 'cls.predictions.*' and
Microsoft's 'lm_predictions.lm_head.*'. Both import; export writes Microsoft's names with
legacy=False. Like transformers, an import skips the absolute position table that v2/v3
checkpoints carry unused (`position_biased_input=False`; our EMD takes it if it is on) and
v3's replaced-token-detection head ('mask_predictions.*').

A model pretrained with our enhanced mask decoder (`emd_layers`) exports as Microsoft's
checkpoints are published: the EMD's position table where they keep it
('deberta.embeddings.position_embeddings.weight', which transformers skips) and
`emd_layers` in config.json (which transformers keeps and ignores). transformers then
computes the MLM logits without the EMD, as it does for Microsoft's checkpoints; hidden
states agree, and an import gets the EMD back.
"""

import dataclasses
from typing import Any, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from hf.bert import COPY, LINEAR, OUT, QKV, QKV_BIAS, Table
from hf.bert import fresh_head, read_groups, write_groups
from models import deberta

MODEL_TYPE = 'deberta-v2'
# HF's hidden_act <-> our activation (as for BERT: HF 'gelu' is the exact erf GELU).
_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
_HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'silu'}
_TERMS = ('c2p', 'p2c')
# What transformers' DeBERTa-v2 is, whatever a config of ours may set.
_HF_MODEL = dict(norm_position='post', norm='layer', use_bias=True, attention='scaled_dot',
                 position='deberta', mask='bidirectional', deberta_v2=True, share_att_key=True,
                 scale_residual_init=False)


# ------------------------------------------------------------------------------- config


def _reject(field: str, value: Any, why: str):
  raise ValueError(f'HF config {field}={value!r}: {why}')


def _terms(hf: Mapping[str, Any]) -> str:
  """HF's pos_att_type (a list, or a string joined by '|') as ours, order kept."""
  value = hf.get('pos_att_type')
  terms = value.split('|') if isinstance(value, str) else list(value or [])
  terms = [str(t).strip().lower() for t in terms]
  if not terms or not set(terms) <= set(_TERMS) or len(set(terms)) != len(terms):
    _reject('pos_att_type', value, f'distinct terms among {_TERMS} are what we map')
  return '|'.join(terms)


def config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """DebertaConfig fields (`DebertaConfig(**fields)`) of an HF DeBERTa-v2 config.json dict."""
  if hf.get('model_type') != MODEL_TYPE:
    _reject('model_type', hf.get('model_type'), f'not {MODEL_TYPE!r}')
  act = hf.get('hidden_act', 'gelu')
  if act not in _ACTIVATIONS:
    _reject('hidden_act', act, f'not one of {sorted(_ACTIVATIONS)}')
  if not hf.get('relative_attention', False):
    _reject('relative_attention', hf.get('relative_attention'),
            'our DeBERTa attends with the disentangled relative terms')
  if not hf.get('share_att_key', False):
    _reject('share_att_key', hf.get('share_att_key'), 'only the layers\' own projections of '
            'the relative embeddings (DeBERTa-v2/v3) are mapped, not separate ones')
  buckets = hf.get('position_buckets', -1)
  if not isinstance(buckets, int) or buckets < 2:
    _reject('position_buckets', buckets, 'log buckets (>= 2 per direction) are what we map')
  if hf.get('conv_kernel_size', 0) > 0:
    _reject('conv_kernel_size', hf['conv_kernel_size'], 'no convolution layer in our model')
  hidden = hf['hidden_size']
  for field, value in (('embedding_size', hf.get('embedding_size')),
                       ('attention_head_size', hf.get('attention_head_size'))):
    expected = hidden if field == 'embedding_size' else hidden // hf['num_attention_heads']
    if value is not None and value != expected:
      _reject(field, value, f'must be {expected}: our widths follow hidden_size')
  norms = {x.strip() for x in str(hf.get('norm_rel_ebd', 'none')).lower().split('|')}
  if not norms <= {'none', 'layer_norm'}:
    _reject('norm_rel_ebd', hf['norm_rel_ebd'], "'layer_norm' or 'none' is what we map")
  for flag in ('is_decoder', 'add_cross_attention'):
    if hf.get(flag, False):
      _reject(flag, hf[flag], 'an encoder without cross-attention is all we map')
  if not hf.get('tie_word_embeddings', True):
    _reject('tie_word_embeddings', False, 'our MLM head is tied to the token embeddings')
  dropout = hf.get('hidden_dropout_prob', 0.1)
  if hf.get('attention_probs_dropout_prob', dropout) != dropout:
    _reject('attention_probs_dropout_prob', hf['attention_probs_dropout_prob'],
            f'we have one dropout_rate, and hidden_dropout_prob={dropout!r} differs')
  max_relative = hf.get('max_relative_positions', -1)
  if max_relative < 1:  # transformers' convention: the absolute positions' range
    max_relative = hf['max_position_embeddings']
  return dict(
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      embed_dim=hidden, mlp_dim=hf['intermediate_size'], vocab_size=hf['vocab_size'],
      max_len=hf['max_position_embeddings'], type_vocab_size=hf.get('type_vocab_size', 0),
      position_biased_input=bool(hf.get('position_biased_input', True)),
      activation=_ACTIVATIONS[act], norm_epsilon=float(hf.get('layer_norm_eps', 1e-7)),
      init_stddev=float(hf.get('initializer_range', 0.02)), dropout_rate=float(dropout),
      pos_att_type=_terms(hf), norm_rel_ebd='layer_norm' if 'layer_norm' in norms else 'none',
      relative_buckets=2 * buckets, relative_max_distance=max_relative,
      # Ours alone (transformers ignores it): see the module docstring.
      emd_layers=hf.get('emd_layers', 0), **_HF_MODEL)


def _check_exportable(cfg: deberta.DebertaConfig) -> None:
  for field, value in _HF_MODEL.items():
    if field == 'scale_residual_init':  # an initialisation, not the architecture
      continue
    if getattr(cfg, field) != value:
      raise ValueError(f'DebertaConfig.{field}={getattr(cfg, field)!r}: HF DeBERTa-v2 '
                       f'needs {value!r}')
  if cfg.activation not in _HF_ACTIVATIONS:
    raise ValueError(f'DebertaConfig.activation={cfg.activation!r}: HF has none of it '
                     f'(one of {sorted(_HF_ACTIVATIONS)})')


def config_to_hf(cfg: deberta.DebertaConfig) -> dict[str, Any]:
  """The config.json of `cfg` for transformers (DebertaV2ForMaskedLM, legacy=False)."""
  _check_exportable(cfg)
  extra = {}
  if cfg.emd_layers:
    logging.warning('HF export: transformers has no enhanced mask decoder; its MLM logits '
                    'will be those of emd_layers=0 (as for Microsoft\'s checkpoints)')
    extra['emd_layers'] = cfg.emd_layers
  return dict(
      architectures=['DebertaV2ForMaskedLM'], model_type=MODEL_TYPE,
      hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
      hidden_act=_HF_ACTIVATIONS[cfg.activation], layer_norm_eps=cfg.norm_epsilon,
      max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
      vocab_size=cfg.vocab_size, initializer_range=cfg.init_stddev,
      hidden_dropout_prob=cfg.dropout_rate, attention_probs_dropout_prob=cfg.dropout_rate,
      relative_attention=True, position_buckets=cfg.relative_buckets // 2,
      max_relative_positions=cfg.relative_max_distance,
      pos_att_type=cfg.pos_att_type.split('|'), share_att_key=True,
      norm_rel_ebd=cfg.norm_rel_ebd, position_biased_input=cfg.position_biased_input,
      legacy=False, tie_word_embeddings=True, pad_token_id=0, dtype=cfg.param_dtype, **extra)


# ------------------------------------------------------------------------------ names


P = 'deberta.'


def _dense(ours: str, hf: str) -> Table:
  return [(f'{ours}/kernel', f'{hf}.weight', LINEAR), (f'{ours}/bias', f'{hf}.bias', COPY)]


def _norm(ours: str, hf: str) -> Table:
  return [(f'{ours}/scale', f'{hf}.weight', COPY), (f'{ours}/bias', f'{hf}.bias', COPY)]


def _layer_table(i: int) -> Table:
  ours, hf = f'encoder/block_{i}', f'{P}encoder.layer.{i}'
  table = []
  for name in ('query', 'key', 'value'):
    proj = f'{hf}.attention.self.{name}_proj'
    table += [(f'{ours}/attention/{name}/kernel', f'{proj}.weight', QKV),
              (f'{ours}/attention/{name}/bias', f'{proj}.bias', QKV_BIAS)]
  table += [(f'{ours}/attention/out/kernel', f'{hf}.attention.output.dense.weight', OUT),
            (f'{ours}/attention/out/bias', f'{hf}.attention.output.dense.bias', COPY)]
  table += _norm(f'{ours}/ln_attention', f'{hf}.attention.output.LayerNorm')
  table += _dense(f'{ours}/mlp/fc_in', f'{hf}.intermediate.dense')
  table += _dense(f'{ours}/mlp/fc_out', f'{hf}.output.dense')
  table += _norm(f'{ours}/ln_mlp', f'{hf}.output.LayerNorm')
  return table


_POSITIONS = f'{P}embeddings.position_embeddings.weight'


def _mlm_table(legacy: bool) -> Table:
  """The MLM head under transformers' legacy names ('cls.predictions') or Microsoft's."""
  if legacy:
    return (_dense('mlm_dense', 'cls.predictions.transform.dense')
            + _norm('mlm_ln', 'cls.predictions.transform.LayerNorm')
            + [('mlm_bias', 'cls.predictions.bias', COPY)])
  return (_dense('mlm_dense', 'lm_predictions.lm_head.dense')
          + _norm('mlm_ln', 'lm_predictions.lm_head.LayerNorm')
          + [('mlm_bias', 'lm_predictions.lm_head.bias', COPY)])


def tables(cfg: deberta.DebertaConfig, *, legacy: bool = False) -> dict[str, Table]:
  """The name map of `cfg`, by group: 'body' (embeddings, relative table and layers,
  required), 'emd' (the EMD's position table, when it has one of its own) and 'mlm'."""
  body = [('token_embed/embedding', f'{P}embeddings.word_embeddings.weight', COPY)]
  if cfg.position_biased_input:
    body.append(('position_embed/embedding', _POSITIONS, COPY))
  if cfg.type_vocab_size:
    body.append(('type_embed/embedding', f'{P}embeddings.token_type_embeddings.weight', COPY))
  body += _norm('ln_embed', f'{P}embeddings.LayerNorm')
  body.append(('encoder/relative_embed/embedding', f'{P}encoder.rel_embeddings.weight', COPY))
  if cfg.norm_rel_ebd == 'layer_norm':
    body += _norm('encoder/relative_embed/norm', f'{P}encoder.LayerNorm')
  for i in range(cfg.num_layers):
    body += _layer_table(i)
  groups = {'body': body}
  if cfg.emd_layers:
    groups['emd'] = [('position_embed/embedding', _POSITIONS, COPY)]
  groups['mlm'] = _mlm_table(legacy)
  return groups


# HF names that repeat another array (the legacy head's decoder): name -> its twin.
_TIED = {'cls.predictions.decoder.weight': f'{P}embeddings.word_embeddings.weight',
         'cls.predictions.decoder.bias': 'cls.predictions.bias'}
_HEAD_PREFIXES = ('cls.', 'lm_predictions.', 'mask_predictions.')
_BUFFERS = ('embeddings.position_ids',)
# What transformers itself skips on load: v3's replaced-token-detection head.
_SKIPPED_PREFIXES = ('mask_predictions.',)


# -------------------------------------------------------------------------- layouts
# hf/bert.py's versions rebuild 'encoder' from its blocks alone; DeBERTa's encoder also
# holds the relative table that its layers share, which must stay.


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled encoder/block_i/... -> scanned encoder/blocks/... with a leading L axis;
  the encoder's other entries (the relative table) unchanged."""
  encoder = dict(params['encoder'])
  blocks = [encoder.pop(f'block_{i}') for i in range(num_layers)]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
  return {**params, 'encoder': {**encoder, 'blocks': stacked}}


def unstack_layers(params: dict) -> dict:
  """Scanned encoder/blocks/... -> unrolled encoder/block_i/... (no-op if unrolled)."""
  encoder = dict(params['encoder'])
  if 'blocks' not in encoder:
    return params
  stacked = encoder.pop('blocks')
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  encoder.update({f'block_{i}': jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
                  for i in range(num_layers)})
  return {**params, 'encoder': encoder}


# ------------------------------------------------------------------------------ params


def expected_shapes(cfg: deberta.DebertaConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Our unrolled param tree's shapes, flat by '/'-joined path."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  tree = jax.eval_shape(deberta.DeBERTa(cfg).init, jax.random.key(0),
                        jnp.zeros((1, 1), jnp.int32))
  return flax.traverse_util.flatten_dict(flax.core.meta.unbox(tree)['params'], sep='/')


def params_from_hf(state: Mapping[str, np.ndarray], cfg: deberta.DebertaConfig, *,
                   seed: int = 0) -> tuple[dict, tuple[str, ...]]:
  """Our param tree (scanned if `cfg.scan_layers`) from an HF state dict, and the groups
  ('emd', 'mlm') it lacked, initialised fresh from `seed`.

  Raises ValueError listing unexpected or missing names, untied decoder weights and
  shapes that do not fit `cfg`.
  """
  # A bare DebertaV2Model names its body without the prefix: add it, remembering the original.
  original = {}
  for name in state:
    canonical = name if name.startswith((P, *_HEAD_PREFIXES)) else P + name
    original[canonical] = name
  hf = {canonical: state[name] for canonical, name in original.items()}

  # transformers' legacy head names, unless only its tied decoder copies carry them.
  legacy = any(name.startswith('cls.') and name not in _TIED for name in hf)
  groups = tables(cfg, legacy=legacy)
  known = {hf_name for table in groups.values() for _, hf_name, _ in table}
  skipped = [original[n] for n in hf if n.startswith(_SKIPPED_PREFIXES)
             or (n == _POSITIONS and n not in known)]
  unexpected = [original[n] for n in hf
                if n not in known and n not in _TIED and not n.endswith(_BUFFERS)
                and original[n] not in skipped]
  if unexpected:
    raise ValueError(f'unexpected HF parameters for DeBERTa-v2 (not in our name map): '
                     f'{sorted(unexpected)}')
  if skipped:
    logging.info('HF import: skipping %s, as transformers does', sorted(skipped))
  for name, twin in _TIED.items():
    if name in hf and twin in hf and not np.array_equal(hf[name], hf[twin]):
      raise ValueError(f'HF {original[name]} differs from {original[twin]}: our MLM head '
                       'is tied to the token embeddings and its bias')

  shapes = expected_shapes(cfg)
  flat, fresh = read_groups(hf, groups, cfg, original, shapes)
  if fresh:
    logging.info('HF import: no %s in the checkpoint; initialised fresh', fresh)
    rng = np.random.default_rng(seed)
    for group in fresh:
      for ours, _, _ in groups[group]:
        if ours.endswith('/embedding'):  # a table, drawn as the model initialises it
          flat[ours] = rng.normal(0.0, cfg.init_stddev, shapes[ours].shape)
        else:
          flat[ours] = fresh_head(ours, shapes[ours].shape, cfg, rng)
  flat = {k: np.ascontiguousarray(v, dtype=shapes[k].dtype) for k, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  if cfg.scan_layers:
    params = stack_layers(params, cfg.num_layers)
  return params, tuple(fresh)


def params_to_hf(params: Mapping[str, Any], cfg: deberta.DebertaConfig) -> dict[str, np.ndarray]:
  """The HF state dict (numpy, contiguous) of our param tree, unrolled or scanned, with
  Microsoft's MLM head names (the config says legacy=False)."""
  _check_exportable(cfg)
  params = unstack_layers(jax.tree.map(np.asarray, flax.core.meta.unbox(dict(params))))
  return write_groups(flax.traverse_util.flatten_dict(params, sep='/'), tables(cfg), cfg)
