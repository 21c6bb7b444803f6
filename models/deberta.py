"""DeBERTa (He et al. 2021) as DeBERTa-v2 and v3 define it, on the shared Encoder stack.

    h_0 = dropout(LN(W_e[tokens] [+ W_p[positions]] [+ W_t[token types]]))
    h_l = LN(h_{l-1} + Attn(h_{l-1}));  h_l = LN(h_l + Mlp(h_l))      post-LN, exact GELU
    Attn: softmax((q·k + c2p + p2c) / sqrt(3H)) v, the disentangled terms over a shared,
          layer-normalised table of relative embeddings (log buckets), projected by each
          layer's own W_q, W_k: the 'deberta' position scheme (models/positions.py)
    mlm = LN(gelu(W_m z + b_m)) W_e^T + b_v                            the tied MLM head

v2/v3 have no absolute positions at the input (`position_biased_input=False`) and v3 no
token types (`type_vocab_size=0`). The MLM head reads z = h_L, as transformers'
DebertaV2ForMaskedLM computes it: both of its heads (`legacy` picks the names) are this
head, and neither has the enhanced mask decoder. The paper's EMD is here behind
`emd_layers` (0 by default, for parity): absolute positions enter just before the head,

    I_0 = h_{L-1} + W_p[positions];   I_s = Layer_L(queries I_{s-1}, keys/values h_{L-1})
    z = I_{emd_layers}

Layer_L being the encoder's last layer, weights shared, as Microsoft's code runs it
(`EnhancedMaskDecoder`, with 2 steps). `hidden` stays h_L.

Dims as in attention.py, plus V (vocabulary) and K (token types).
"""

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models import layers
from models import positions as positions_lib
from models import transformer

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class DebertaConfig(transformer.TransformerConfig):
  """DeBERTa's hyperparameters: the shared stack's with DeBERTa-v2's block and disentangled
  attention, plus its embeddings, the MLM head and the optional EMD;
  `DebertaConfig(**config.model)`."""
  vocab_size: int
  max_len: int = 512                # rows of the absolute position table (when there is one)
  type_vocab_size: int = 0          # token types; 0: none (v3), 2: segments A/B
  position_biased_input: bool = False  # absolute positions at the input (v2/v3: no)
  emd_layers: int = 0               # EMD steps before the MLM head: 0 (transformers), 2 (paper)
  # Disentangled attention: the 'deberta' scheme with DeBERTa-v2's settings.
  position: str = 'deberta'
  deberta_v2: bool = True           # v2's log buckets, p2c index and relative dropout
  share_att_key: bool = True        # the relative table projected by each layer's W_q, W_k
  pos_att_type: str = 'c2p|p2c'     # the relative terms: scale 1/sqrt(H * (1 + terms))
  norm_rel_ebd: str = 'layer_norm'  # 'layer_norm' on the relative table, or 'none'
  relative_buckets: int = 512       # rows of the relative table: 2 x HF position_buckets
  relative_max_distance: int = 512  # HF max_relative_positions: where the log buckets end
  # DeBERTa's block: post-LN, exact GELU, LayerNorm epsilon 1e-7, no depth-scaled init.
  norm_position: str = 'post'
  norm_epsilon: float = 1e-7
  activation: str = 'gelu'
  scale_residual_init: bool = False
  mask: str = 'bidirectional'

  causal = False  # an encoder

  def __post_init__(self):
    for name in ('vocab_size', 'max_len'):
      self._check_positive_int(name)
    for name in ('type_vocab_size', 'emd_layers'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        self._fail(f'{name} must be a non-negative integer, got {value!r}')
    if not isinstance(self.position_biased_input, bool):
      self._fail(f'position_biased_input must be a bool, got {self.position_biased_input!r}')
    if self.emd_layers and self.position_biased_input:
      self._fail(f'emd_layers={self.emd_layers} needs {self._name("position_biased_input")}'
                 '=False: DeBERTa adds absolute positions once, at the input or in the EMD')
    if self.emd_layers and self.norm_position != 'post':
      self._fail(f'emd_layers={self.emd_layers} needs {self._name("norm_position")}=\'post\' '
                 "(DeBERTa's block, whose outputs the EMD's queries and keys are)")
    super().__post_init__()
    if type(self.position_scheme).embed is not positions_lib.NoPositions.embed:
      self._fail(f'position={self.position!r} adds positions at the input; DeBERTa takes '
                 'them there from position_biased_input, so pick a scheme inside attention')


class DeBERTa(nn.Module):
  """A DeBERTa encoder with its MLM head.

  Returns a dict: 'hidden' [B, T, D] (the last layer), 'mlm_logits' [B, T, V] (float32),
  and with `hidden_states=True` 'hidden_states': (embeddings, layer 1, ..., layer L).
  """
  config: DebertaConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, *, token_types_BT: Array | None = None,
               segment_ids_BT: Array | None = None, positions_BT: Array | None = None,
               deterministic: bool = True, hidden_states: bool = False) -> dict[str, Array]:
    """Encodes `tokens_BT`; the arguments are BERT's (models/bert.py).

    Token types are ignored without a type table (`type_vocab_size=0`) and read as 0 with
    a single type. Padding and packed sequences come from `segment_ids_BT` (0 = padding).
    """
    cfg = self.config
    dtype, param_dtype = cfg.compute_dtype, cfg.storage_dtype
    batch_size, length = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    init = nn.initializers.normal(stddev=cfg.init_stddev)

    embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=init, name='token_embed')
    x_BTD = embed(tokens_BT)
    position_table = None
    if cfg.position_biased_input or cfg.emd_layers:
      position_table = positions_lib.LearnedPositions(
          cfg.max_len, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
          stddev=cfg.init_stddev, name='position_embed')
    if cfg.position_biased_input:
      x_BTD = x_BTD + position_table(positions_BT)
    if cfg.type_vocab_size:
      if token_types_BT is None or cfg.type_vocab_size == 1:
        token_types_BT = jnp.zeros_like(tokens_BT)
      x_BTD = x_BTD + layers.Embed(cfg.type_vocab_size, cfg.embed_dim, dtype=dtype,
                                   param_dtype=param_dtype, embedding_init=init,
                                   name='type_embed')(token_types_BT)
    x_BTD = self._norm('ln_embed')(x_BTD)
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)

    stack = transformer.Encoder(cfg, name='encoder')(
        x_BTD, segment_ids_BT=segment_ids_BT, positions_BT=positions_BT,
        deterministic=deterministic, hidden_states=hidden_states or cfg.emd_layers > 0)
    z_BTD = stack.hidden_BTD
    if cfg.emd_layers:
      # Keys and values: the last layer's input h_{L-1}; queries start from it plus the
      # absolute positions (raw embeddings, not normalised, as in Microsoft's code).
      kv_BTD = stack.hidden_states[-2]
      z_BTD = self._enhanced_mask_decoder(
          kv_BTD + position_table(positions_BT), kv_BTD, segment_ids_BT, positions_BT,
          deterministic)
    outputs = {'hidden': stack.hidden_BTD, 'mlm_logits': self._mlm_head(z_BTD, embed)}
    if hidden_states:
      outputs['hidden_states'] = stack.hidden_states
    return outputs

  def _norm(self, name: str) -> nn.Module:
    cfg = self.config
    return layers.NORMS[cfg.norm](epsilon=cfg.norm_epsilon, use_bias=cfg.use_bias,
                                  dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                                  name=name)

  def _mlm_head(self, hidden_BTD: Array, embed: layers.Embed) -> Array:
    """LN(act(dense(h))) scored against the tied token embeddings, plus an output bias."""
    cfg = self.config
    h_BTD = nn.Dense(
        cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        # One array cannot name 'embed' twice: the output axis is 'mlp', as in BERT.
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_stddev),
                                                 ('embed', 'mlp')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)),
        name='mlm_dense')(hidden_BTD)
    h_BTD = self._norm('mlm_ln')(layers.activation(cfg.activation)(h_BTD))
    bias_V = self.param('mlm_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                        (cfg.vocab_size,), cfg.storage_dtype)
    return embed.attend(h_BTD) + bias_V.astype(jnp.float32)

  def _enhanced_mask_decoder(self, query_BTD: Array, kv_BTD: Array,
                             segment_ids_BT: Array | None, positions_BT: Array,
                             deterministic: bool) -> Array:
    """`emd_layers` steps of the encoder's last layer, queries from `query_BTD`.

    The layer's parameters (and what the stack shares, e.g. the relative table) are read
    from the encoder and applied again, so the EMD has no weights of its own and works for
    unrolled and scanned layers alike.
    """
    cfg = self.config
    encoder = flax.core.meta.unbox(self.variables['params']['encoder'])
    if cfg.scan_layers:
      last = jax.tree.map(lambda x: x[-1], encoder['blocks'])
    else:
      last = encoder[f'block_{cfg.num_layers - 1}']
    shared = {k: v for k, v in encoder.items() if k != 'blocks' and not k.startswith('block_')}
    rngs = {} if deterministic else {'dropout': self.make_rng('dropout')}
    return _LastLayerAgain(cfg, parent=None).apply(
        {'params': {**shared, 'last_block': last}}, query_BTD, kv_BTD,
        segment_ids_BT=segment_ids_BT, positions_BT=positions_BT, deterministic=deterministic,
        rngs=rngs)


class _LastLayerAgain(nn.Module):
  """The EMD's steps: the shared Block (as 'last_block') with its self-attention's keys and
  values taken from `kv_BTD` while queries and residual follow the query stream.

  Its parameter names are the Encoder's (what the stack shares) plus 'last_block', so the
  encoder's own parameters apply. The shared Block has no separate keys input for its
  self-attention, so the swap is made by intercepting that one call.
  """
  config: DebertaConfig

  @nn.compact
  def __call__(self, query_BTD: Array, kv_BTD: Array, *, segment_ids_BT: Array | None,
               positions_BT: Array, deterministic: bool) -> Array:
    cfg = self.config
    batch_size, length = query_BTD.shape[:2]
    mask_B1TS = cfg.mask_pattern(attention.sequence_index(batch_size, length))
    if segment_ids_BT is not None:
      mask_B1TS &= attention.segment_mask(segment_ids_BT)
    context = transformer.position_context(cfg, positions_BT, positions_BT, bidirectional=True)

    def keys_from_kv(next_fun, args, kwargs, call):
      if (call.method_name == '__call__' and call.module.name == 'attention'
          and isinstance(call.module, attention.MultiHeadAttention)):
        kwargs = {**kwargs, 'kv_BSD': kv_BTD}
      return next_fun(*args, **kwargs)

    block = transformer.Block(cfg, cfg.mask_pattern, name='last_block')
    for _ in range(cfg.emd_layers):
      with nn.intercept_methods(keys_from_kv):
        query_BTD = block(query_BTD, mask_B1TS, None, context, None, None, deterministic, False)
    return query_BTD
