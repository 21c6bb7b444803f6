"""BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019), on the shared Encoder stack.

    h_0 = dropout(LN(W_e[tokens] + W_p[positions + offset] + W_t[token types]))
    h_l = LN(h_{l-1} + Attn(h_{l-1}));  h_l = LN(h_l + Mlp(h_l))      post-LN, exact GELU
    pooled   = tanh(W_pool h_L[CLS] + b)                                the pooler
    mlm      = LN(gelu(W_m h_L + b_m)) W_e^T + b_v                      the tied MLM head
    nsp      = W_nsp pooled + b                                         [is next, random]

RoBERTa is a preset of this config (`roberta_preset`): one token type, no NSP head, and
position ids offset by the padding index + 1 = 2, as RoBERTa numbers them, so imported
weights line up. Attention, positions and masks are the shared ones, swappable by name.

The embeddings are a module of their own (`Embeddings`), so that ELECTRA's generator and
discriminator can share one (models/electra.py). With `embedding_size` E < D they are E
wide and projected to D (ELECTRA, ALBERT), and the tied MLM head maps back to E:
    h_0 = W_proj · (embeddings)  [E -> D];   mlm = LN(gelu(W_m h_L)) W_e^T + b_v   [D -> E -> V]

Dims as in attention.py, plus V (vocabulary) and K (token types).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import heads
from models import layers
from models import transformer

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(transformer.TransformerConfig):
  """BERT's hyperparameters: the shared stack's, with BERT's block, plus its embeddings
  and heads; built from a config as `BertConfig(**config.model)`."""
  vocab_size: int
  max_len: int                 # rows of the position table (RoBERTa: 512 + its offset 2)
  type_vocab_size: int = 2     # token types (segments A/B); RoBERTa has 1
  position_offset: int = 0     # added to position ids before the lookup; RoBERTa: 2
  next_sentence: bool = True   # the NSP head (RoBERTa drops it)
  mlm_head: bool = True        # the MLM head (ELECTRA's discriminator has none)
  embedding_size: int = 0      # E, the embeddings' width; 0: embed_dim (no projection)
  # BERT's block: post-LN, exact GELU, LayerNorm epsilon 1e-12, no depth-scaled init.
  norm_position: str = 'post'
  norm_epsilon: float = 1e-12
  activation: str = 'gelu'
  scale_residual_init: bool = False
  mask: str = 'bidirectional'

  causal = False  # an encoder: every token sees both directions

  def __post_init__(self):
    for name in ('vocab_size', 'max_len', 'type_vocab_size'):
      self._check_positive_int(name)
    if self.embedding_size:
      self._check_positive_int('embedding_size')
    if not isinstance(self.position_offset, int) or self.position_offset < 0:
      self._fail(f'position_offset must be a non-negative integer, got {self.position_offset!r}')
    if self.position_offset >= self.max_len:
      self._fail(f'position_offset={self.position_offset} leaves no positions below '
                 f'{self._name("max_len")}={self.max_len}')
    super().__post_init__()

  @property
  def embedding_width(self) -> int:
    """E: `embedding_size`, or the model width when it is 0."""
    return self.embedding_size or self.embed_dim


def roberta_preset(**overrides: Any) -> dict[str, Any]:
  """The fields by which RoBERTa differs from BERT (Liu et al. 2019, and its checkpoints)."""
  return {**dict(type_vocab_size=1, position_offset=2, next_sentence=False, norm_epsilon=1e-5),
          **overrides}


def _norm(cfg: BertConfig, name: str) -> nn.Module:
  return layers.NORMS[cfg.norm](epsilon=cfg.norm_epsilon, use_bias=cfg.use_bias,
                                dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name=name)


class Embeddings(nn.Module):
  """Token + position + token-type embeddings, LayerNorm and dropout: [B, T] -> [B, T, E].

  Returns the embedded inputs and the token table `[V, E]` that tied output heads score
  against. Its parameters are token_embed, position_embed (when the positional scheme has
  a table), type_embed and ln_embed.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, token_types_BT: Array, positions_BT: Array, *,
               deterministic: bool) -> tuple[Array, Array]:
    cfg = self.config
    dtype, param_dtype, width = cfg.compute_dtype, cfg.storage_dtype, cfg.embedding_width
    init = nn.initializers.normal(stddev=cfg.init_stddev)
    embed = layers.Embed(cfg.vocab_size, width, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=init, name='token_embed')
    x_BTE = embed(tokens_BT)
    position_BTE = cfg.position_scheme.embed(positions_BT + cfg.position_offset,
                                             max_len=cfg.max_len, features=width,
                                             dtype=dtype, param_dtype=param_dtype)
    if position_BTE is not None:
      x_BTE = x_BTE + position_BTE
    x_BTE = x_BTE + layers.Embed(cfg.type_vocab_size, width, dtype=dtype,
                                 param_dtype=param_dtype, embedding_init=init,
                                 name='type_embed')(token_types_BT)
    x_BTE = _norm(cfg, 'ln_embed')(x_BTE)
    x_BTE = nn.Dropout(cfg.dropout_rate)(x_BTE, deterministic=deterministic)
    return x_BTE, embed.embedding_VD


class BERT(nn.Module):
  """A BERT encoder with its pooler and pretraining heads.

  Returns a dict: 'hidden' [B, T, D] (the last layer), 'pooled' [B, D], 'mlm_logits'
  [B, T, V] (float32) when the config has the MLM head, 'nsp_logits' [B, 2] (float32;
  index 0 = "B follows A", as in Google's and Hugging Face's checkpoints) when it has the
  NSP head, and with `hidden_states=True` 'hidden_states': (embeddings, layer 1, ...,
  layer L). Heads whose outputs a caller ignores cost nothing under jit (XLA drops them).

  `embeddings`: an `Embeddings` module owned by a parent, shared with another encoder
  (ELECTRA); by default BERT owns its own, its parameters at BERT's top level.
  """
  config: BertConfig
  embeddings: nn.Module | None = None

  @nn.compact
  def __call__(self, tokens_BT: Array, *, token_types_BT: Array | None = None,
               segment_ids_BT: Array | None = None, positions_BT: Array | None = None,
               mlm_at_BM: Array | None = None, deterministic: bool = True,
               hidden_states: bool = False) -> dict[str, Array]:
    """Encodes `tokens_BT`.

    Args:
      tokens_BT: integer token ids, [CLS] (or <s>) first.
      token_types_BT: segment A/B ids (0/1); None: all 0.
      segment_ids_BT: packed-sequence ids, 0 = padding; attention stays within a sequence
        and never sees padding. None: one sequence per row, no padding. (Never derived
        from token ids: RoBERTa pads with id 1.)
      positions_BT: position ids from 0 (restarting per packed sequence); None: 0..T-1.
        The config's `position_offset` is added here.
      mlm_at_BM: slots (indices into T) at which to run the MLM head, M per row: then
        'mlm_logits' is [B, M, V]. The head's [T, V] logits are most of a small model's
        FLOPs, and pretraining scores only the ~15% selected slots (BERT's and ELECTRA's
        released code gather them the same way). None: every slot.
      deterministic: disables dropout (pass rngs={'dropout': ...} otherwise).
      hidden_states: also return every layer's hidden states.
    """
    cfg = self.config
    batch_size, length = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    if token_types_BT is None or cfg.type_vocab_size == 1:
      # One token type (RoBERTa): sentence B is marked by its separators alone, so the
      # pair layout's type ids of B are read as type 0 (as RoBERTa's tokenizer gives them).
      token_types_BT = jnp.zeros_like(tokens_BT)
    embeddings = self.embeddings
    if embeddings is None:
      # Its parameters keep BERT's flat names (token_embed, ...), as checkpoints have them.
      embeddings = Embeddings(cfg)
      nn.share_scope(self, embeddings)
    x_BTE, table_VE = embeddings(tokens_BT, token_types_BT, positions_BT,
                                 deterministic=deterministic)
    x_BTD = x_BTE
    if cfg.embedding_width != cfg.embed_dim:
      x_BTD = self._dense(cfg.embed_dim, 'embed_project')(x_BTE)

    # Schemes inside attention see the offset-free ids: a relative distance is the same.
    stack = transformer.Encoder(cfg, name='encoder')(
        x_BTD, segment_ids_BT=segment_ids_BT, positions_BT=positions_BT,
        deterministic=deterministic, hidden_states=hidden_states)
    hidden_BTD = stack.hidden_BTD

    outputs = {'hidden': hidden_BTD, 'pooled': self._pool(hidden_BTD[:, 0])}
    if cfg.mlm_head:
      head_inputs_BMD = hidden_BTD if mlm_at_BM is None else jnp.take_along_axis(
          hidden_BTD, mlm_at_BM[..., None], axis=1)
      outputs['mlm_logits'] = self._mlm_head(head_inputs_BMD, table_VE)
    if cfg.next_sentence:
      outputs['nsp_logits'] = self._dense(2, 'nsp', out_axis='classes')(
          outputs['pooled']).astype(jnp.float32)
    if hidden_states:
      outputs['hidden_states'] = stack.hidden_states
    return outputs

  def _dense(self, features: int, name: str, out_axis: str = 'mlp') -> nn.Module:
    """A dense layer from the model width; a D -> D one names its output axis 'mlp' (one
    array cannot name 'embed' twice)."""
    cfg = self.config
    return nn.Dense(
        features, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_stddev),
                                                 ('embed', out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
        name=name)

  def _pool(self, first_BD: Array) -> Array:
    """The pooler: a dense layer and tanh over the first token's ([CLS]) hidden state."""
    return jnp.tanh(self._dense(self.config.embed_dim, 'pooler')(first_BD))

  def _mlm_head(self, hidden_BTD: Array, table_VE: Array) -> Array:
    """LN(act(dense(h))) [D -> E] scored against the tied token embeddings, plus a bias."""
    cfg = self.config
    h_BTE = self._dense(cfg.embedding_width, 'mlm_dense')(hidden_BTD)
    h_BTE = layers.activation(cfg.activation)(h_BTE)
    h_BTE = _norm(cfg, 'mlm_ln')(h_BTE)
    bias_V = self.param('mlm_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                        (cfg.vocab_size,), cfg.storage_dtype)
    logits_BTV = layers.tied_logits(h_BTE.astype(cfg.compute_dtype),
                                    table_VE.astype(cfg.compute_dtype))
    logits_BTV = nn.with_logical_constraint(logits_BTV, ('batch', 'length', 'vocab'))
    return logits_BTV + bias_V.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertClassifierConfig(BertConfig):
  """A BERT with a sequence classification (or regression, `num_labels=1`) head."""
  num_labels: int = 2
  pooling: str = 'cls'  # heads.POOLINGS: cls (the pooler on [CLS]) | mean | max over tokens

  def __post_init__(self):
    self._check_positive_int('num_labels')
    if self.pooling not in heads.POOLINGS:
      self._fail(f'pooling={self.pooling!r} is not one of: {", ".join(sorted(heads.POOLINGS))}')
    super().__post_init__()


class BertClassifier(nn.Module):
  """Fine-tuning: BERT (its parameters under 'bert', as pretraining saved them), a pooling
  of its last layer, dropout and a dense layer to `num_labels` float32 logits.

  Returns {'logits': [B, num_labels], 'pooled': [B, D], 'hidden': [B, T, D]}.
  """
  config: BertClassifierConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, *, token_types_BT: Array | None = None,
               segment_ids_BT: Array | None = None, positions_BT: Array | None = None,
               deterministic: bool = True, hidden_states: bool = False) -> dict[str, Array]:
    cfg = self.config
    outputs = BERT(cfg, name='bert')(
        tokens_BT, token_types_BT=token_types_BT, segment_ids_BT=segment_ids_BT,
        positions_BT=positions_BT, deterministic=deterministic, hidden_states=hidden_states)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    # 'cls' is BERT's own pooler (dense + tanh on [CLS]); mean and max pool the last layer.
    pooled_BD = (outputs['pooled'] if cfg.pooling == 'cls' else
                 heads.POOLINGS[cfg.pooling](outputs['hidden'], segment_ids_BT))
    pooled_BD = nn.Dropout(cfg.dropout_rate)(pooled_BD, deterministic=deterministic)
    logits_BC = nn.Dense(
        cfg.num_labels, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_stddev),
                                                 ('embed', 'classes')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('classes',)),
        name='classifier')(pooled_BD)
    return {**{k: v for k, v in outputs.items() if k in ('hidden', 'hidden_states')},
            'pooled': pooled_BD, 'logits': logits_BC.astype(jnp.float32)}
