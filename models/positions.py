"""Positional schemes, picked by name (`GPTConfig.position`) and set by their settings.

A scheme is a small frozen dataclass whose fields are its settings, named as the config
fields that carry them (`relative_window`, `relative_buckets`, `relative_max_distance`,
`rope_base`), so `make(name, settings)` takes what it needs from a whole model config. A
stack (GPT; later the shared encoder/decoder stacks) calls its hooks at three places:

  embed(positions_BT, ...)  at the input: `[B, T, D]` added to the token embeddings, or
                            None (learned, sinusoidal);
  shared(context, ...)      once per stack, inside the stack's module: what every layer
                            shares (T5's bias, DeBERTa's relative embeddings), stored in
                            `PositionContext.shared`;
  rotate / attend           inside `MultiHeadAttention(position=scheme)`: rotate q and the
                            new keys before they are cached (RoPE), then attend with a bias
                            on the logits (ALiBi, T5, DeBERTa) or with relative keys and
                            values (Shaw). Parameters these create live in the layer.

Positions are explicit position ids `[B, T]`: packed documents restart them at 0, decoding
takes them from the cache, and every scheme (absolute or relative) reads those ids, never
slot indices, so a packed document computes what it computes alone. Only 'learned' has a
table and so a largest position (`max_len`); the others work at any position.
"""

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import relative

Array = jax.Array
Dtype = Any
PositionContext = relative.PositionContext


class LearnedPositions(nn.Module):
  """A learned table of absolute position embeddings `[max_len, D]` (GPT-2, BERT).

  Attributes:
    max_len: number of positions; positions must lie in [0, max_len).
    features: D.
    dtype: dtype of the returned embeddings.
    param_dtype: storage dtype of the table.
    stddev: standard deviation of the normal initializer.
  """
  max_len: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  stddev: float = 0.02

  @nn.compact
  def __call__(self, positions_BT: Array) -> Array:
    table_LD = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(self.stddev), ('length', 'embed')),
        (self.max_len, self.features), self.param_dtype)
    x_BTD = jnp.take(table_LD, positions_BT, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))


SINUSOID_LAYOUTS = ('interleaved', 'concatenated')


def sinusoidal(positions_BT: Array, features: int, base: float = 10000.0,
               layout: str = 'interleaved') -> Array:
  """Vaswani et al. 2017: PE(p, 2i) = sin(p / base^(2i/D)), PE(p, 2i+1) = cos(...), float32.

  `layout='concatenated'` puts the same values as [sin of every frequency | cos of every
  frequency] (tensor2tensor, fairseq, Marian).
  """
  inv_freq_F = base ** (-jnp.arange(0, features, 2, dtype=jnp.float32) / features)
  angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
  if layout == 'concatenated':  # Odd D: one more sin than cos, as Marian's table.
    cos_BTF = jnp.cos(angle_BTF)[..., :features - angle_BTF.shape[-1]]
    return jnp.concatenate([jnp.sin(angle_BTF), cos_BTF], axis=-1)
  pe_BTF2 = jnp.stack([jnp.sin(angle_BTF), jnp.cos(angle_BTF)], axis=-1)
  return pe_BTF2.reshape(*positions_BT.shape, -1)[..., :features]  # Odd D drops a cos.


def rotate_half(x_BLNH: Array, positions_BL: Array, base: float = 10000.0) -> Array:
  """RoPE (Su et al. 2021) in the rotate-half layout of GPT-NeoX and LLaMA.

  Feature i is paired with feature i + H/2 (not with its neighbour, as in the paper's
  interleaved layout; the two differ by a fixed permutation of the head's features) and
  the pair is rotated by the angle p · base^(-2i/H). q·k then depends on positions only
  through their difference. Computed in float32, returned in x's dtype.
  """
  half = x_BLNH.shape[-1] // 2
  inv_freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x_BLNH.shape[-1])
  angle_BL1F = (positions_BL[..., None].astype(jnp.float32) * inv_freq_F)[:, :, None, :]
  cos, sin = jnp.cos(angle_BL1F), jnp.sin(angle_BL1F)
  x_BLNH32 = x_BLNH.astype(jnp.float32)
  x1, x2 = x_BLNH32[..., :half], x_BLNH32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BLNH.dtype)


def _require(context: PositionContext | None, scheme: str) -> PositionContext:
  if context is None:
    raise ValueError(f'position {scheme!r} acts inside attention: pass position_context')
  return context


def _check_positive(scheme, *names: str, kind: type | tuple[type, ...] = int) -> None:
  """Messages start with the setting's name, which is also the config field's."""
  for name in names:
    value = getattr(scheme, name)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
      raise ValueError(f'{name} must be a positive {getattr(kind, "__name__", "number")} '
                       f'for position {scheme.name!r}, got {value!r}')


# --------------------------------------------------------------------------- schemes


@dataclasses.dataclass(frozen=True)
class NoPositions:
  """No positional information at all; every other scheme overrides some of these no-ops."""
  name: ClassVar[str] = 'none'

  def embed(self, positions_BT: Array, *, max_len: int, features: int, dtype: Dtype,
            param_dtype: Dtype) -> Array | None:
    """`[B, T, D]` to add to the input embeddings, or None."""
    del positions_BT, max_len, features, dtype, param_dtype
    return None

  def shared(self, context: PositionContext, *, num_heads: int, features: int,
             bidirectional: bool, dtype: Dtype, param_dtype: Dtype) -> Any:
    """What every attention layer of a stack shares, computed once per forward pass."""
    del context, num_heads, features, bidirectional, dtype, param_dtype
    return None

  def rotate(self, q_BTNH: Array, k_BSNH: Array, context: PositionContext | None, *,
             decode: bool) -> tuple[Array, Array]:
    """q and the new keys (before caching: in decode mode, at the queries' positions)."""
    del context, decode
    return q_BTNH, k_BSNH

  def bias(self, q_BTNH: Array, k_BSNH: Array, context: PositionContext | None, *,
           score: str, dtype: Dtype, param_dtype: Dtype) -> Array | None:
    """float32 `[B, N, T, S]` added to the logits, or None."""
    del q_BTNH, k_BSNH, context, score, dtype, param_dtype
    return None

  def attend(self, q_BTNH: Array, k_BSNH: Array, v_BSNH: Array,
             context: PositionContext | None, *, attend: Callable[..., Array],
             mask_B1TS: Array | None, score: str, kernel: str,
             dropout: Callable[[Array], Array] | None, dtype: Dtype,
             param_dtype: Dtype) -> Array:
    """Attention `[B, T, N, H]` inside MultiHeadAttention, with this scheme's bias.

    `attend(q, k, v, bias_BNTS=...)` is the layer's own attention (its mask, score,
    kernel and dropout, also passed separately for schemes that compute their own).
    """
    del mask_B1TS, kernel, dropout
    bias_BNTS = self.bias(q_BTNH, k_BSNH, context, score=score, dtype=dtype,
                          param_dtype=param_dtype)
    return attend(q_BTNH, k_BSNH, v_BSNH, bias_BNTS=bias_BNTS)


@dataclasses.dataclass(frozen=True)
class Learned(NoPositions):
  """Learned absolute embeddings at the input (GPT-2, BERT); positions < max_len."""
  name: ClassVar[str] = 'learned'

  def embed(self, positions_BT, *, max_len, features, dtype, param_dtype):
    return LearnedPositions(max_len=max_len, features=features, dtype=dtype,
                            param_dtype=param_dtype, name='position_embed')(positions_BT)


@dataclasses.dataclass(frozen=True)
class Sinusoidal(NoPositions):
  """Fixed sinusoids at the input (Vaswani et al. 2017); any position, no parameters.

  Vaswani et al. add unit-amplitude sinusoids to token embeddings multiplied by sqrt(D),
  about unit size per entry. Our embeddings start at std 0.02 (GPT-2), so the sinusoids
  are scaled to that size: unscaled, they swamped the tokens and the model did not train
  (docs/positions.md).
  """
  name: ClassVar[str] = 'sinusoidal'
  sinusoid_scale: float = 0.02
  sinusoid_layout: str = 'interleaved'  # or 'concatenated' (see `sinusoidal`)

  def __post_init__(self):
    _check_positive(self, 'sinusoid_scale', kind=(int, float))
    if self.sinusoid_layout not in SINUSOID_LAYOUTS:
      raise ValueError(f'sinusoid_layout must be one of {SINUSOID_LAYOUTS} for position '
                       f'{self.name!r}, got {self.sinusoid_layout!r}')

  def embed(self, positions_BT, *, max_len, features, dtype, param_dtype):
    del max_len, param_dtype
    x_BTD = self.sinusoid_scale * sinusoidal(positions_BT, features, layout=self.sinusoid_layout)
    x_BTD = x_BTD.astype(dtype)
    return nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))


@dataclasses.dataclass(frozen=True)
class Rope(NoPositions):
  """Rotary embeddings of q and k in every layer (rotate-half layout, see `rotate_half`)."""
  name: ClassVar[str] = 'rope'
  rope_base: float = 10000.0

  def __post_init__(self):
    _check_positive(self, 'rope_base', kind=(int, float))

  def rotate(self, q_BTNH, k_BSNH, context, *, decode):
    context = _require(context, self.name)
    # Self-attention: the new keys sit at the queries' positions when decoding.
    k_positions_BS = context.q_positions_BT if decode else context.kv_positions_BS
    return (rotate_half(q_BTNH, context.q_positions_BT, self.rope_base),
            rotate_half(k_BSNH, k_positions_BS, self.rope_base))


@dataclasses.dataclass(frozen=True)
class Alibi(NoPositions):
  """Press et al. 2022: logits get -m_h · |i - j|, slopes m_h geometric in the head.

  On the causal part (j <= i) that is the paper's -m_h · (i - j); the absolute value makes
  the same bias symmetric for bidirectional stacks. Unscaled, as in the paper.
  """
  name: ClassVar[str] = 'alibi'

  def bias(self, q_BTNH, k_BSNH, context, *, score, dtype, param_dtype):
    del k_BSNH, score, dtype, param_dtype
    distance_BTS = jnp.abs(relative.relative_distance(_require(context, self.name)))
    slopes_N = relative.alibi_slopes(q_BTNH.shape[-2])
    return -slopes_N[None, :, None, None] * distance_BTS[:, None].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class T5(NoPositions):
  """T5's learned bias per relative-distance bucket and head, shared by the layers.

  Causal stacks (GPT, decoders) pass `bidirectional=False`, encoders True. Added to the
  logits as they are (T5 itself uses an unscaled dot score: set attention='dot' for that).
  """
  name: ClassVar[str] = 't5'
  relative_buckets: int = 32
  relative_max_distance: int = 128

  def __post_init__(self):
    _check_positive(self, 'relative_buckets', 'relative_max_distance')
    if self.relative_buckets < 4:
      raise ValueError(f'relative_buckets must be >= 4 for position {self.name!r} (half '
                       f'exact, half log-spaced, per direction), got {self.relative_buckets}')

  def shared(self, context, *, num_heads, features, bidirectional, dtype, param_dtype):
    del features, dtype
    return relative.T5Bias(num_heads=num_heads, num_buckets=self.relative_buckets,
                           max_distance=self.relative_max_distance,
                           bidirectional=bidirectional, param_dtype=param_dtype,
                           name='relative_bias')(context)

  def bias(self, q_BTNH, k_BSNH, context, *, score, dtype, param_dtype):
    return _require(context, self.name).shared


@dataclasses.dataclass(frozen=True)
class Shaw(NoPositions):
  """Shaw et al. 2018: learned relative keys and values clipped at `relative_window` = k.

  No positions at the input. Needs the 'xla' kernel (see `relative.ShawAttention`).
  """
  name: ClassVar[str] = 'shaw'
  relative_window: int = 16

  def __post_init__(self):
    _check_positive(self, 'relative_window')

  def attend(self, q_BTNH, k_BSNH, v_BSNH, context, *, attend, mask_B1TS, score, kernel,
             dropout, dtype, param_dtype):
    del attend, dtype
    if kernel != 'xla':
      raise ValueError(f"position 'shaw' adds relative values, which need the attention "
                       f"probabilities: use kernel='xla', not {kernel!r}")
    return relative.ShawAttention(self.relative_window, param_dtype=param_dtype,
                                  name='relative')(
                                      q_BTNH, k_BSNH, v_BSNH, _require(context, self.name),
                                      mask_B1TS=mask_B1TS, score=score, dropout=dropout)


@dataclasses.dataclass(frozen=True)
class Deberta(NoPositions):
  """He et al. 2021: content->content + content->position + position->content.

  A relative embedding table `[relative_buckets, D]` (log buckets up to
  `relative_max_distance`) is shared by the layers; each layer projects it. The terms
  share the scale: with a dot score of scale s (1/sqrt(H) for 'scaled_dot') and c of the
  relative terms on, logits = (q·k + c2p + p2c) · s / sqrt(1 + c). No positions at the
  input.

  Its defaults are the paper's equation as first written here (docs/positions.md ran
  them); DeBERTa-v2 and v3, as released, set (models/deberta.py does):
    deberta_v2=True        its log buckets (`relative.deberta_v2_bucket_index`, reaching
                           bucket 2·mid - 1 at distance relative_max_distance - 1), p2c at
                           δ(i, j) as its code computes it, and dropout on the relative
                           embeddings in every layer (the attention's dropout);
    share_att_key=True     the table projected by the layer's own W_q, W_k (and biases);
    norm_rel_ebd='layer_norm'  a LayerNorm (epsilon `norm_epsilon`) on the shared table.
  `pos_att_type` names the relative terms, 'c2p|p2c', 'c2p' or 'p2c' (as transformers).
  `relative_buckets` is twice transformers' `position_buckets` (rows of both directions).
  """
  name: ClassVar[str] = 'deberta'
  relative_buckets: int = 32
  relative_max_distance: int = 128
  deberta_v2: bool = False
  share_att_key: bool = False
  pos_att_type: str = 'c2p|p2c'
  norm_rel_ebd: str = 'none'
  norm_epsilon: float = 1e-5

  def __post_init__(self):
    _check_positive(self, 'relative_buckets', 'relative_max_distance')
    _check_positive(self, 'norm_epsilon', kind=(int, float))
    if self.relative_buckets < 4 or self.relative_buckets % 2:
      raise ValueError(f'relative_buckets must be even and >= 4 for position {self.name!r} '
                       f'(half per direction), got {self.relative_buckets}')
    mid = self.relative_buckets // 4
    if self.deberta_v2 and self.relative_max_distance - 1 <= mid:
      raise ValueError(f'relative_max_distance must exceed relative_buckets // 4 + 1 = '
                       f'{mid + 1} for position {self.name!r} with deberta_v2 (its log '
                       f'buckets start past {mid}), got {self.relative_max_distance}')
    for name in ('deberta_v2', 'share_att_key'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{name} must be a bool for position {self.name!r}, '
                         f'got {getattr(self, name)!r}')
    terms = self.terms
    if (not terms or len(set(terms)) != len(terms)
        or not set(terms) <= set(relative.DISENTANGLED_TERMS)):
      raise ValueError(f"pos_att_type must name distinct terms among 'c2p' and 'p2c', "
                       f"joined by '|', for position {self.name!r}, got {self.pos_att_type!r}")
    if self.norm_rel_ebd not in ('none', 'layer_norm'):
      raise ValueError(f"norm_rel_ebd must be 'none' or 'layer_norm' for position "
                       f"{self.name!r}, got {self.norm_rel_ebd!r}")

  @property
  def terms(self) -> tuple[str, ...]:
    """The relative terms on, e.g. ('c2p', 'p2c')."""
    if not isinstance(self.pos_att_type, str):
      return ()
    return tuple(term.strip() for term in self.pos_att_type.split('|'))

  def shared(self, context, *, num_heads, features, bidirectional, dtype, param_dtype):
    del context, num_heads, bidirectional
    epsilon = self.norm_epsilon if self.norm_rel_ebd == 'layer_norm' else None
    return relative.RelativeEmbedding(self.relative_buckets, features, norm_epsilon=epsilon,
                                      dtype=dtype, param_dtype=param_dtype,
                                      name='relative_embed')()

  def attend(self, q_BTNH, k_BSNH, v_BSNH, context, *, attend, mask_B1TS, score, kernel,
             dropout, dtype, param_dtype):
    del mask_B1TS, kernel
    context = _require(context, self.name)
    if self.deberta_v2 and dropout is not None:
      # DeBERTa-v2 drops entries of the relative table in each layer, at the rate of the
      # attention's dropout (transformers: hidden_dropout_prob, which must equal it here).
      context = context.replace(shared=dropout(context.shared))
    terms_BNTS = relative.DisentangledBias(
        num_buckets=self.relative_buckets, max_distance=self.relative_max_distance,
        terms=self.terms, v2=self.deberta_v2, share_att_key=self.share_att_key,
        dtype=dtype, param_dtype=param_dtype, name='relative')(q_BTNH, k_BSNH, context)
    # Dividing q by sqrt(1 + c) puts the content term on the same footing, so any kernel
    # (cuDNN's included) computes it.
    shrink = 1.0 / math.sqrt(1 + len(self.terms))
    bias_BNTS = terms_BNTS * (relative.dot_scale(score, q_BTNH.shape[-1]) * shrink)
    return attend((q_BTNH * shrink).astype(q_BTNH.dtype), k_BSNH, v_BSNH, bias_BNTS=bias_BNTS)


# -------------------------------------------------------------------------- registry


POSITIONS: dict[str, type] = {
    cls.name: cls for cls in (NoPositions, Learned, Sinusoidal, Rope, Alibi, T5, Shaw, Deberta)
}

def register(name: str, cls: type) -> None:
  """Makes the scheme class `cls` selectable as `position=name`."""
  POSITIONS[name] = cls


def get(name: str) -> type:
  if name not in POSITIONS:
    raise ValueError(f'unknown position encoding {name!r} (known: {", ".join(sorted(POSITIONS))})')
  return POSITIONS[name]


def make(name: str, settings: Mapping[str, Any] | None = None) -> NoPositions:
  """The scheme `name`, with the settings it has taken from `settings` (other keys ignored)."""
  cls = get(name)
  settings = settings or {}
  return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})
