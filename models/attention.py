"""Multi-head attention with its masks, scores and kernels, shared by every model family.

Dimension legend (tensors carry their shape as a suffix, e.g. `q_BTNH`):
  B  batch
  T  query length (target)
  S  key/value length (source); in decode mode, the length of the cache
  N  attention heads
  H  width of one head
  D  model (embedding) width

    attention(q, k, v) = softmax(score(q, k) + bias, where mask) · v

Three parts are picked by name from small registries, so variants plug in without branching:
  * SCORES: how a query and a key become a logit: 'scaled_dot', 'dot', 'general' (q·W·k)
    and 'additive' (vᵀ·tanh(W·q + U·k)), each a small Flax module;
  * MASKS: which keys a query sees: 'bidirectional', 'causal', 'prefix_lm',
    'sliding_window', 'bigbird' (settings in a frozen dataclass);
  * KERNELS: how the whole computation runs: 'xla' (explicit einsums, the reference),
    'cudnn' (the fused kernel behind `jax.nn.dot_product_attention`) and 'block_sparse'
    (models/block_sparse.py: only the blocks of a block-structured mask).

Masks are boolean `[B, 1, T, S]` arrays, True where a query may attend to a key, and are
combined with `&` (e.g. a MASKS entry & `segment_mask` for packed documents). A query row
with no visible key (padding) yields zeros, never NaN.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Protocol

from absl import logging
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Logits of masked positions. Finite, so a fully masked row softmaxes to a uniform row
# (which the kernels then zero) instead of to NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------- masks


def causal_mask(q_index_BT: Array, kv_index_BS: Array | None = None) -> Array:
  """True where the key's index is at or before the query's: `[B, 1, T, S]`.

  Indices are slots in the sequence (or in the KV cache), not position ids, so the mask
  stays right for packed documents whose positions restart.
  """
  kv_index_BS = q_index_BT if kv_index_BS is None else kv_index_BS
  return kv_index_BS[:, None, None, :] <= q_index_BT[:, None, :, None]


def segment_mask(q_segment_ids_BT: Array, kv_segment_ids_BS: Array | None = None) -> Array:
  """True where query and key share the same nonzero segment id: `[B, 1, T, S]`.

  Segment 0 is padding: it neither attends nor is attended to. Packed documents get ids
  1, 2, ... so attention never crosses a document boundary.
  """
  kv_segment_ids_BS = q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
  q_B1T1 = q_segment_ids_BT[:, None, :, None]
  kv_B11S = kv_segment_ids_BS[:, None, None, :]
  return (q_B1T1 == kv_B11S) & (q_B1T1 != 0) & (kv_B11S != 0)


def padding_mask(q_valid_BT: Array, kv_valid_BS: Array | None = None) -> Array:
  """True where both query and key are real tokens: `[B, 1, T, S]`."""
  kv_valid_BS = q_valid_BT if kv_valid_BS is None else kv_valid_BS
  return segment_mask(q_valid_BT.astype(jnp.int32), kv_valid_BS.astype(jnp.int32))


def bidirectional_mask(q_index_BT: Array, kv_index_BS: Array | None = None) -> Array:
  """True everywhere (encoders): `[B, 1, T, S]`."""
  kv_index_BS = q_index_BT if kv_index_BS is None else kv_index_BS
  batch_size = max(q_index_BT.shape[0], kv_index_BS.shape[0])
  return jnp.ones((batch_size, 1, q_index_BT.shape[1], kv_index_BS.shape[1]), jnp.bool_)


def prefix_lm_mask(q_index_BT: Array, prefix_lengths_B: Array,
                   kv_index_BS: Array | None = None) -> Array:
  """Causal, except that row b's first `prefix_lengths_B[b]` slots all see each other.

  The prefix LM of Raffel et al. 2020 (T5, sec. 3.2.1): the prefix (an input, a prompt)
  is read bidirectionally, the rest is predicted left to right. `[B, 1, T, S]`.
  """
  kv_index_BS = q_index_BT if kv_index_BS is None else kv_index_BS
  in_prefix_B11S = kv_index_BS[:, None, None, :] < prefix_lengths_B[:, None, None, None]
  return causal_mask(q_index_BT, kv_index_BS) | in_prefix_B11S


def sliding_window_mask(q_index_BT: Array, kv_index_BS: Array | None = None, *, window: int,
                        causal: bool = False) -> Array:
  """True where key and query are fewer than `window` slots apart: `[B, 1, T, S]`.

  |i - j| < window (Longformer's local attention); with `causal`, 0 <= i - j < window
  (Mistral's), so each query sees itself and the window - 1 slots before it.
  """
  kv_index_BS = q_index_BT if kv_index_BS is None else kv_index_BS
  distance_B1TS = q_index_BT[:, None, :, None] - kv_index_BS[:, None, None, :]
  near_B1TS = jnp.abs(distance_B1TS) < window
  return near_B1TS & (distance_B1TS >= 0) if causal else near_B1TS


def bigbird_layout(num_q_blocks: int, num_kv_blocks: int, *, window: int, num_global: int,
                   num_random: int, seed: int, causal: bool) -> np.ndarray:
  """Which key blocks each query block sees: a static numpy bool `[T/b, S/b]`.

  BigBird-ITC (Zaheer et al. 2020): block i sees its neighbours |i - j| <= window, the
  first `num_global` blocks (which in turn see every block), and `num_random` more blocks
  drawn with `seed`. Causal: only blocks j <= i, random ones drawn from the past. Row i's
  draw depends on (seed, i) and its candidates only, so a causal layout for more blocks
  extends the one for fewer: decoding over a longer KV cache sees the same blocks.
  """
  q_R1 = np.arange(num_q_blocks)[:, None]
  kv_1C = np.arange(num_kv_blocks)[None, :]
  visible_RC = (np.abs(q_R1 - kv_1C) <= window) | (kv_1C < num_global) | (q_R1 < num_global)
  allowed_RC = kv_1C <= q_R1 if causal else np.ones_like(visible_RC)
  visible_RC &= allowed_RC
  for row in range(num_q_blocks if num_random else 0):
    candidates = np.flatnonzero(allowed_RC[row] & ~visible_RC[row])
    if candidates.size:
      rng = np.random.default_rng((seed, row))
      picked = rng.choice(candidates, min(num_random, candidates.size), replace=False)
      visible_RC[row, picked] = True
  return visible_RC


def bigbird_mask(q_index_BT: Array, kv_index_BS: Array | None = None, *, block_size: int,
                 window: int = 1, num_global: int = 1, num_random: int = 1, seed: int = 0,
                 causal: bool = False) -> Array:
  """`bigbird_layout` at token granularity (and causal within a block): `[B, 1, T, S]`.

  Slots must lie below max(T, S), as they do in self-attention and for a chunk of queries
  over a KV cache: the layout is built for that many slots.
  """
  kv_index_BS = q_index_BT if kv_index_BS is None else kv_index_BS
  num_blocks = -(-max(q_index_BT.shape[1], kv_index_BS.shape[1]) // block_size)
  layout_RC = jnp.asarray(bigbird_layout(
      num_blocks, num_blocks, window=window, num_global=num_global, num_random=num_random,
      seed=seed, causal=causal))
  q_block_B1T1 = (q_index_BT // block_size)[:, None, :, None]
  kv_block_B11S = (kv_index_BS // block_size)[:, None, None, :]
  mask_B1TS = layout_RC[q_block_B1T1, kv_block_B11S]
  return mask_B1TS & causal_mask(q_index_BT, kv_index_BS) if causal else mask_B1TS


def sequence_index(batch_size: int, length: int, offset: Array | int = 0) -> Array:
  """`offset + [0, 1, ..., length-1]` for every row: `[B, T]` int32 slots."""
  index_T = offset + jnp.arange(length, dtype=jnp.int32)
  return jnp.broadcast_to(index_T, (batch_size, length))


def _has_visible_key(mask_B1TS: Array) -> Array:
  """`[B, 1, T, 1]`: whether each query row may attend to anything at all."""
  return jnp.any(mask_B1TS, axis=-1, keepdims=True)


class Mask(Protocol):
  """The settings of a mask, picked by name from MASKS (`GPTConfig.mask`).

  A mask is built from slots, `mask(q_index_BT, kv_index_BS)`, so one mask serves a whole
  sequence and a chunk of queries over a KV cache alike. `autoregressive`: no query sees
  a later key (past a prefix), so a decoder may use it. Masks with a block structure also
  have `block_size`, `block_layout(num_q_blocks, num_kv_blocks)` (static numpy bool) and
  `local_mask(q_index_BT, kv_index_BS)` (the token-level mask inside a kept block): the
  block-sparse kernel computes only those blocks.
  """
  autoregressive: bool

  def __call__(self, q_index_BT: Array, kv_index_BS: Array | None = None, *,
               prefix_lengths_B: Array | None = None) -> Array:
    ...


def _check_no_prefix(mask: Mask, prefix_lengths_B: Array | None) -> None:
  if prefix_lengths_B is not None:
    raise ValueError(f"prefix_lengths_B is for the 'prefix_lm' mask, not {mask!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
  # The message starts with the field's name, so GPTConfig can prefix its own.
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')


@dataclasses.dataclass(frozen=True)
class BidirectionalMask:
  """Every query sees every key (encoders)."""
  autoregressive: ClassVar[bool] = False

  def __call__(self, q_index_BT, kv_index_BS=None, *, prefix_lengths_B=None):
    _check_no_prefix(self, prefix_lengths_B)
    return bidirectional_mask(q_index_BT, kv_index_BS)


@dataclasses.dataclass(frozen=True)
class CausalMask:
  """Each query sees the keys at or before its slot (decoders)."""
  autoregressive: ClassVar[bool] = True

  def __call__(self, q_index_BT, kv_index_BS=None, *, prefix_lengths_B=None):
    _check_no_prefix(self, prefix_lengths_B)
    return causal_mask(q_index_BT, kv_index_BS)


@dataclasses.dataclass(frozen=True)
class PrefixLMMask:
  """`prefix_lm_mask`: needs `prefix_lengths_B`, one prefix length per row."""
  autoregressive: ClassVar[bool] = True

  def __call__(self, q_index_BT, kv_index_BS=None, *, prefix_lengths_B=None):
    if prefix_lengths_B is None:
      raise ValueError("the 'prefix_lm' mask needs prefix_lengths_B, one length per row")
    return prefix_lm_mask(q_index_BT, prefix_lengths_B, kv_index_BS)


@dataclasses.dataclass(frozen=True)
class SlidingWindowMask:
  """`sliding_window_mask`, tiled for the block-sparse kernel by blocks of `block_size`.

  With blocks of b slots, a window of w reaches ceil((w - 1) / b) blocks either side, so
  sparse cost is O(T·w) whatever b; `block_size` 0 means b = w.
  """
  window: int
  causal: bool = False
  block_size: int = 0

  def __post_init__(self):
    _check_int('window', self.window, 1)
    _check_int('block_size', self.block_size, 0)
    if not self.block_size:
      object.__setattr__(self, 'block_size', self.window)

  @property
  def autoregressive(self) -> bool:
    return self.causal

  def __call__(self, q_index_BT, kv_index_BS=None, *, prefix_lengths_B=None):
    _check_no_prefix(self, prefix_lengths_B)
    return self.local_mask(q_index_BT, kv_index_BS)

  def local_mask(self, q_index_BT, kv_index_BS=None):
    return sliding_window_mask(q_index_BT, kv_index_BS, window=self.window, causal=self.causal)

  def block_layout(self, num_q_blocks: int, num_kv_blocks: int) -> np.ndarray:
    reach = -(-(self.window - 1) // self.block_size)
    distance_RC = np.arange(num_q_blocks)[:, None] - np.arange(num_kv_blocks)[None, :]
    near_RC = np.abs(distance_RC) <= reach
    return near_RC & (distance_RC >= 0) if self.causal else near_RC


@dataclasses.dataclass(frozen=True)
class BigBirdMask:
  """`bigbird_mask`: blocks of `block_size` slots; window, global and random in blocks."""
  block_size: int
  window_blocks: int = 1
  global_blocks: int = 1
  random_blocks: int = 1
  seed: int = 0
  causal: bool = False

  def __post_init__(self):
    _check_int('block_size', self.block_size, 1)
    for name in ('window_blocks', 'global_blocks', 'random_blocks'):
      _check_int(name, getattr(self, name), 0)

  @property
  def autoregressive(self) -> bool:
    return self.causal

  def __call__(self, q_index_BT, kv_index_BS=None, *, prefix_lengths_B=None):
    _check_no_prefix(self, prefix_lengths_B)
    return bigbird_mask(q_index_BT, kv_index_BS, block_size=self.block_size,
                        window=self.window_blocks, num_global=self.global_blocks,
                        num_random=self.random_blocks, seed=self.seed, causal=self.causal)

  def local_mask(self, q_index_BT, kv_index_BS=None):
    return (causal_mask if self.causal else bidirectional_mask)(q_index_BT, kv_index_BS)

  def block_layout(self, num_q_blocks: int, num_kv_blocks: int) -> np.ndarray:
    # Square, as `bigbird_mask` builds it, so random draws agree with the dense mask.
    num_blocks = max(num_q_blocks, num_kv_blocks)
    layout_RC = bigbird_layout(num_blocks, num_blocks, window=self.window_blocks,
                               num_global=self.global_blocks, num_random=self.random_blocks,
                               seed=self.seed, causal=self.causal)
    return layout_RC[:num_q_blocks, :num_kv_blocks]


MASKS: dict[str, type] = {
    'bidirectional': BidirectionalMask,
    'causal': CausalMask,
    'prefix_lm': PrefixLMMask,
    'sliding_window': SlidingWindowMask,
    'bigbird': BigBirdMask,
}


def register_mask(name: str, cls: type) -> None:
  """Makes a Mask dataclass selectable as `make_mask(name, ...)` and `GPTConfig.mask`."""
  MASKS[name] = cls


def make_mask(name: str, /, **settings: Any) -> Mask:
  """The mask registered as `name`, built from those of `settings` that it takes.

  The others are dropped, so a config can carry every mask's settings side by side
  (`window` matters only to 'sliding_window', `block_size` to the block-structured ones).
  """
  if name not in MASKS:
    raise ValueError(f'unknown attention mask {name!r} (known: {", ".join(sorted(MASKS))})')
  cls = MASKS[name]
  fields = {field.name for field in dataclasses.fields(cls)}
  return cls(**{key: value for key, value in settings.items() if key in fields})


# ---------------------------------------------------------------------------- scores


class Score(Protocol):
  """Maps queries and keys to float32 logits `[B, N, T, S]`."""

  def __call__(self, q_BTNH: Array, k_BSNH: Array) -> Array:
    ...


# Every score is a Flax module built as `SCORES[name](dtype=..., param_dtype=..., name=...)`
# inside MultiHeadAttention, so a score with parameters (q·W·k, additive) keeps them beside
# the projections. Parameters are shaped from the inputs' N and H when first called, so a
# score runs unchanged on any T and S (the block-sparse kernel calls it on blocks). The
# parameter-free ones may also be called unbound, e.g. by `attend(score='dot')`.


class DotProductScore(nn.Module):
  """q·k, divided by sqrt(H) when `scaled` (Vaswani et al. 2017, eq. 1); no parameters."""
  scaled: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def scale(self, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if self.scaled else 1.0

  def __call__(self, q_BTNH: Array, k_BSNH: Array) -> Array:
    # Accumulate in float32 even for bfloat16 inputs: the softmax needs the precision.
    logits_BNTS = jnp.einsum('btnh,bsnh->bnts', q_BTNH, k_BSNH,
                             preferred_element_type=jnp.float32)
    return logits_BNTS * self.scale(q_BTNH.shape[-1])


def _scaled_identity(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
  """`[N, H, H]` copies of I/sqrt(H): a bilinear score that starts as the scaled dot."""
  del key  # Deterministic.
  num_heads, head_dim, _ = shape
  eye_HH = jnp.eye(head_dim, dtype=dtype) / math.sqrt(head_dim)
  return jnp.broadcast_to(eye_HH, (num_heads, head_dim, head_dim))


class BilinearScore(nn.Module):
  """Luong et al. 2015's 'general' score q·W·k, with a learned `W` `[N, H, H]` per head.

  W starts as I/sqrt(H), i.e. as the scaled dot product, so swapping scores does not also
  change where training starts.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = _scaled_identity

  @nn.compact
  def __call__(self, q_BTNH: Array, k_BSNH: Array) -> Array:
    num_heads, head_dim = q_BTNH.shape[-2:]
    w_NHG = self.param(
        'kernel', nn.with_logical_partitioning(self.kernel_init, ('heads', 'kv', None)),
        (num_heads, head_dim, head_dim), self.param_dtype)
    # (q·W)·k: one [T, H] x [H, H] product per head, then the usual dot with the keys.
    qw_BTNG = jnp.einsum('btnh,nhg->btng', q_BTNH, w_NHG.astype(self.dtype),
                         preferred_element_type=jnp.float32)
    return jnp.einsum('btng,bsng->bnts', qw_BTNG, k_BSNH.astype(jnp.float32))


class AdditiveScore(nn.Module):
  """Bahdanau et al. 2015's additive score vᵀ·tanh(W·q + U·k), per head.

  W, U: `[N, H, A]`, v: `[N, A]`, with A = `features` (default H). The tanh does not
  factor, so it materialises `[B, T, S, N, A]` floats: O(T·S·N·A) memory, A times the
  logits' own. Fine for small models and for the block-sparse kernel's blocks; at long
  lengths use a dot-product score.

  `project_keys=False` takes keys already projected, k = U·h (A = H wide; no U here): a
  recurrent decoder scoring the same keys at every step projects them once per source,
  as Bahdanau et al. note (appendix A.1.2), instead of once per step.
  """
  features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1,
                                                          batch_axis=(0,))
  project_keys: bool = True

  @nn.compact
  def __call__(self, q_BTNH: Array, k_BSNH: Array) -> Array:
    num_heads, head_dim = q_BTNH.shape[-2:]
    features = self.features or head_dim

    def param(name, init, shape, axes):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype).astype(self.dtype)

    w_shape = (num_heads, head_dim, features)
    w_NHA = param('query_kernel', self.kernel_init, w_shape, ('heads', 'kv', None))
    if self.project_keys:
      u_NHA = param('key_kernel', self.kernel_init, w_shape, ('heads', 'kv', None))
      uk_BSNA = jnp.einsum('bsnh,nha->bsna', k_BSNH, u_NHA, preferred_element_type=jnp.float32)
    elif k_BSNH.shape[-1] != features:
      raise ValueError(f'AdditiveScore(project_keys=False) adds the keys to W·q, so they must '
                       f'be features={features} wide, got {k_BSNH.shape[-1]}')
    else:
      uk_BSNA = k_BSNH.astype(jnp.float32)
    v_NA = param('vector', nn.initializers.lecun_normal(in_axis=-1, out_axis=-2),
                 (num_heads, features), ('heads', None))
    wq_BTNA = jnp.einsum('btnh,nha->btna', q_BTNH, w_NHA, preferred_element_type=jnp.float32)
    hidden_BTSNA = jnp.tanh(wq_BTNA[:, :, None] + uk_BSNA[:, None])
    return jnp.einsum('btsna,na->bnts', hidden_BTSNA, v_NA.astype(jnp.float32))


ScoreBuilder = Callable[..., Score]

SCORES: dict[str, ScoreBuilder] = {
    'scaled_dot': functools.partial(DotProductScore, scaled=True),
    'dot': functools.partial(DotProductScore, scaled=False),
    'general': BilinearScore,
    'additive': AdditiveScore,
}


def register_score(name: str, builder: ScoreBuilder) -> None:
  """Makes a score selectable as `MultiHeadAttention(score=name)`.

  `builder(dtype=..., param_dtype=..., name=...)` returns the score, usually a Flax module
  class (or a `functools.partial` of one with its settings).
  """
  SCORES[name] = builder


def build_score(name: str, /, **kwargs: Any) -> Score:
  """`SCORES[name](**kwargs)`: inside a module, pass `name=` to place its parameters."""
  if name not in SCORES:
    raise ValueError(f'unknown attention score {name!r} (known: {", ".join(sorted(SCORES))})')
  return SCORES[name](**kwargs)


def get_score(name: str) -> Score:
  """The score registered as `name`, built unbound: the parameter-free ones run as is."""
  return build_score(name)


# --------------------------------------------------------------------------- kernels


class Kernel(Protocol):
  """Computes attention outputs `[B, T, N, H]` from projected queries, keys and values.

  `dropout` (or None) is applied to the attention probabilities; `bias_BNTS` is added to
  the logits (relative positions, ALiBi). Query rows without a visible key give zeros.
  `pattern` (or None) is the block-structured Mask that `mask_B1TS` lies within (queries
  and keys at slots 0.., as in self-attention over a whole sequence): dense kernels ignore
  it, sparse kernels compute only its blocks (and use it as the mask when `mask_B1TS` is
  None).
  """

  def __call__(self, q_BTNH: Array, k_BSNH: Array, v_BSNH: Array, *, score: Score,
               mask_B1TS: Array | None, bias_BNTS: Array | None,
               dropout: Callable[[Array], Array] | None, pattern: Mask | None) -> Array:
    ...


def xla_kernel(q_BTNH, k_BSNH, v_BSNH, *, score, mask_B1TS=None, bias_BNTS=None,
               dropout=None, pattern=None):
  """The equation as explicit einsums; any score, dropout on the probabilities."""
  del pattern  # Dense: every block is computed anyway.
  logits_BNTS = score(q_BTNH, k_BSNH)
  if bias_BNTS is not None:
    logits_BNTS = logits_BNTS + bias_BNTS.astype(jnp.float32)
  if mask_B1TS is not None:
    logits_BNTS = jnp.where(mask_B1TS, logits_BNTS, _MASKED)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
  if mask_B1TS is not None:
    probs_BNTS = jnp.where(_has_visible_key(mask_B1TS), probs_BNTS, 0.0)
  if dropout is not None:
    probs_BNTS = dropout(probs_BNTS)
  return jnp.einsum('bnts,bsnh->btnh', probs_BNTS.astype(v_BSNH.dtype), v_BSNH)


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


def _cudnn_unsupported(q_BTNH: Array) -> str | None:
  """Why cuDNN's fused attention cannot run here, or None when it can."""
  if jax.default_backend() != 'gpu':
    return f'no GPU (backend is {jax.default_backend()!r})'
  if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
    return f'cuDNN attention needs bfloat16/float16 inputs, got {q_BTNH.dtype}'
  return None


def cudnn_kernel(q_BTNH, k_BSNH, v_BSNH, *, score, mask_B1TS=None, bias_BNTS=None,
                 dropout=None, pattern=None):
  """`jax.nn.dot_product_attention` with cuDNN; XLA's version where cuDNN cannot run.

  Any boolean mask works: it goes to cuDNN as is (broadcast over heads).
  """
  del pattern  # Dense, as for 'xla'.
  if not isinstance(score, DotProductScore):
    raise ValueError(f"kernel 'cudnn' computes dot-product scores only, not {score!r}; "
                     "use kernel='xla'")
  if dropout is not None:
    raise ValueError("kernel 'cudnn' has no dropout on attention probabilities; use "
                     "kernel='xla', dropout_rate=0 or deterministic=True")
  implementation = 'cudnn'
  reason = _cudnn_unsupported(q_BTNH)
  if reason is not None:
    _warn_once(f"attention kernel 'cudnn' falls back to jax's default: {reason}")
    implementation = None
  out_BTNH = jax.nn.dot_product_attention(
      q_BTNH, k_BSNH, v_BSNH, bias=bias_BNTS, mask=mask_B1TS,
      scale=score.scale(q_BTNH.shape[-1]), implementation=implementation)
  if mask_B1TS is not None:
    # jax averages the values of a fully masked row; our contract is zeros.
    visible_BT11 = jnp.swapaxes(_has_visible_key(mask_B1TS), 1, 2)
    out_BTNH = jnp.where(visible_BT11, out_BTNH, 0)
  return out_BTNH


KERNELS: dict[str, Kernel] = {'xla': xla_kernel, 'cudnn': cudnn_kernel}


def register_kernel(name: str, kernel: Kernel) -> None:
  """Makes `kernel` selectable as `MultiHeadAttention(kernel=name)`."""
  KERNELS[name] = kernel


def attend(q_BTNH: Array, k_BSNH: Array, v_BSNH: Array, *, mask_B1TS: Array | None = None,
           bias_BNTS: Array | None = None, score: str | Score = 'scaled_dot',
           kernel: str = 'xla', dropout: Callable[[Array], Array] | None = None,
           pattern: Mask | None = None) -> Array:
  """Attention of projected heads, with score and kernel picked by name: `[B, T, N, H]`.

  `score` is a name in SCORES or a built score. A name builds the score unbound, which
  serves the parameter-free ones; a score with parameters must come built and bound
  (MultiHeadAttention passes its own).
  """
  if kernel not in KERNELS:
    raise ValueError(f'unknown attention kernel {kernel!r} (known: {", ".join(sorted(KERNELS))})')
  if isinstance(score, str):
    score = get_score(score)
  return KERNELS[kernel](q_BTNH, k_BSNH, v_BSNH, score=score, mask_B1TS=mask_B1TS,
                         bias_BNTS=bias_BNTS, dropout=dropout, pattern=pattern)


# ---------------------------------------------------------------------------- module


class MultiHeadAttention(nn.Module):
  """Multi-head attention: q/k/v projections D -> (N, H), attention, output (N, H) -> D.

  Attributes:
    num_heads: N.
    head_dim: H.
    dtype: compute dtype; logits and softmax are float32 regardless.
    param_dtype: storage dtype of the parameters.
    dropout_rate: dropout on the attention probabilities and on the output.
    score: a name in SCORES; its parameters (if any) live under 'score'.
    kernel: a name in KERNELS.
    mask: the Mask of self-attention (a MASKS entry, e.g. `make_mask('bigbird', ...)`), or
      None for causal. Decode mode masks the cache with it; otherwise it is the pattern
      a sparse kernel computes, which the call's `mask_B1TS` must lie within.
    use_bias: whether the projections have biases (GPT-2 and BERT do, T5 does not).
    kernel_init: initializer of the q/k/v projections.
    out_kernel_init: initializer of the output projection (GPT-2 scales it by depth).
    position: a positional scheme from positions.py acting inside attention (rotating q
      and k, biasing the logits, relative keys/values), or None; its hooks read the
      positions from the call's `position_context`.
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  score: str = 'scaled_dot'
  kernel: str = 'xla'
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.normal(stddev=0.02)
  out_kernel_init: Initializer = nn.initializers.normal(stddev=0.02)
  position: Any = None
  mask: Mask | None = None
  cross: bool = False  # cross-attention: in decode mode, caches the source's keys/values

  @nn.compact
  def __call__(self, x_BTD: Array, kv_BSD: Array | None = None, *,
               mask_B1TS: Array | None = None, segment_ids_BT: Array | None = None,
               position_context: Any = None, deterministic: bool = True,
               decode: bool = False, prefix_lengths_B: Array | None = None) -> Array:
    """Attends from `x_BTD` to itself, or to `kv_BSD` (cross-attention).

    Args:
      x_BTD: the queries' inputs (and keys'/values' for self-attention).
      kv_BSD: the keys'/values' inputs for cross-attention; None for self-attention.
      mask_B1TS: boolean mask, True = may attend. Not used in decode mode.
      segment_ids_BT: decode mode only: segment ids of the new tokens (0 = padding),
        cached beside their keys so that later queries skip padded slots.
      prefix_lengths_B: decode mode only, for the 'prefix_lm' `mask` (which needs it on
        every call): each row's prefix length in cache slots. A query in the prefix sees
        the whole prefix, keys after its own included: write the prefix in one call.
      deterministic: disables dropout.
      decode: causal self-attention over a KV cache in the 'cache' collection. The first
        call (inside `init`) shapes the cache from `x_BTD` (`[B, N, S_max, H]`); each later
        call writes a chunk of T >= 1 new tokens at `cache_index` and attends to every
        cached slot up to its own (or in its row's prefix, for 'prefix_lm'; and of the
        same segment) that `mask` lets it see.
        With `cross`: a call with `kv_BSD` projects the source's keys and values once and
        caches them; a call with `kv_BSD=None` attends to the cached ones (`mask_B1TS`,
        built by the caller from the source's segment ids, may be given).
      position_context: a `relative.PositionContext` (query and key position ids, what
        the stack's layers share) for the `position` scheme's hooks.

    Returns:
      `[B, T, D]` in `dtype`.
    """
    self_decode = decode and not self.cross
    if mask_B1TS is not None and self_decode:
      raise ValueError('decode mode builds its mask from the cache; pass segment_ids_BT '
                       'to mask padding instead of mask_B1TS')
    if segment_ids_BT is not None and not self_decode:
      raise ValueError('segment_ids_BT is for self-attention in decode mode; otherwise fold '
                       'segments into mask_B1TS with segment_mask()')
    if prefix_lengths_B is not None and not self_decode:
      raise ValueError('prefix_lengths_B is for self-attention in decode mode; otherwise '
                       'build mask_B1TS with prefix_lm_mask()')
    if kv_BSD is not None and self_decode:
      raise ValueError('decode mode caches self-attention; a layer attending to a source '
                       'needs cross=True')
    if self.cross and not decode and kv_BSD is None:
      raise ValueError('cross-attention needs kv_BSD (the source) outside decode mode')

    q_BTNH = self._project_in('query', x_BTD)
    if self.cross and decode:
      k_BSNH, v_BSNH = self._source_cache(kv_BSD)
    else:
      kv_BSD = x_BTD if kv_BSD is None else kv_BSD
      k_BSNH = self._project_in('key', kv_BSD)
      v_BSNH = self._project_in('value', kv_BSD)
    if self.position is not None:
      # Before the cache: cached keys keep the rotation of their own position (RoPE).
      q_BTNH, k_BSNH = self.position.rotate(q_BTNH, k_BSNH, position_context, decode=decode)
    if self_decode:
      k_BSNH, v_BSNH, mask_B1TS = self._update_cache(k_BSNH, v_BSNH, segment_ids_BT,
                                                     prefix_lengths_B)

    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      dropout = functools.partial(nn.Dropout(self.dropout_rate, name='attention_dropout'),
                                  deterministic=False)
    score = build_score(self.score, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='score')
    # Over the cache the queries' slots are traced, so no block layout is known when
    # compiling: sparse kernels then attend densely over the (masked) cache.
    attend_fn = functools.partial(attend, mask_B1TS=mask_B1TS, score=score,
                                  kernel=self.kernel, dropout=dropout,
                                  pattern=None if decode else self.mask)
    if self.position is None:
      out_BTNH = attend_fn(q_BTNH, k_BSNH, v_BSNH)
    else:
      # The scheme adds its bias (`attend_fn(..., bias_BNTS=)`), or relative keys/values.
      out_BTNH = self.position.attend(
          q_BTNH, k_BSNH, v_BSNH, position_context, attend=attend_fn, mask_B1TS=mask_B1TS,
          score=self.score, kernel=self.kernel, dropout=dropout, dtype=self.dtype,
          param_dtype=self.param_dtype)
    out_BTNH = nn.with_logical_constraint(out_BTNH, ('batch', 'length', 'heads', 'kv'))

    out_BTD = nn.DenseGeneral(
        features=x_BTD.shape[-1], axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(self.out_kernel_init,
                                                 ('heads', 'kv', 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
        name='out')(out_BTNH)
    out_BTD = nn.Dropout(self.dropout_rate)(out_BTD, deterministic=deterministic)
    return nn.with_logical_constraint(out_BTD, ('batch', 'length', 'embed'))

  def _project_in(self, name: str, x_BLD: Array) -> Array:
    """One of the q/k/v projections D -> (N, H)."""
    y_BLNH = nn.DenseGeneral(
        features=(self.num_heads, self.head_dim), axis=-1, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, ('embed', 'heads', 'kv')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('heads', 'kv')),
        name=name)(x_BLD)
    return nn.with_logical_constraint(y_BLNH, ('batch', 'length', 'heads', 'kv'))

  def _source_cache(self, kv_BSD: Array | None) -> tuple[Array, Array]:
    """Cross-attention's keys and values in decode mode, projected once per source.

    With `kv_BSD` (the first decode call, and `init`) they are projected and cached; with
    None (every later step) they are read back. Stored `[B, N, S, H]` as the self-attention
    cache is, for the same reason: that is the layout the score and value einsums read
    (stored `[B, S, N, H]`, XLA:CPU transposed every layer's source keys and values at
    every step, most of a beam-search step's time).
    """
    if kv_BSD is not None:
      k_BSNH, v_BSNH = self._project_in('key', kv_BSD), self._project_in('value', kv_BSD)
      self.put_variable('cache', 'source_key', jnp.swapaxes(k_BSNH, 1, 2))
      self.put_variable('cache', 'source_value', jnp.swapaxes(v_BSNH, 1, 2))
      return k_BSNH, v_BSNH
    if not self.has_variable('cache', 'source_key'):
      raise ValueError('cross-attention in decode mode: the first call must pass the source '
                       '(kv_BSD) so that its keys and values are cached')
    k_BNSH, v_BNSH = self.get_variable('cache', 'source_key'), self.get_variable(
        'cache', 'source_value')
    # Views in the kernels' [B, S, N, H]; XLA folds the swap into the einsums.
    return jnp.swapaxes(k_BNSH, 1, 2), jnp.swapaxes(v_BNSH, 1, 2)

  def _update_cache(self, k_BTNH: Array, v_BTNH: Array, segment_ids_BT: Array | None,
                    prefix_lengths_B: Array | None) -> tuple[Array, Array, Array | None]:
    """Writes the new keys/values at `cache_index`; returns the whole cache and its mask.

    The cache is stored `[B, N, S_max, H]`, heads before slots: the layout the score and
    value einsums read, so a decode step reads the cache in place. (Stored `[B, S, N, H]`,
    XLA:CPU copied the whole cache into that layout at every step, which was most of a
    decode step's time.) One shared `cache_index`: batched prompts of different lengths
    are left-padded, their padding marked by segment id 0. Writing past S_max is not
    checked (XLA clamps the slice): size the cache for the whole generation.

    The mask is `mask`'s over cache slots (a 'prefix_lm' one with `prefix_lengths_B` in
    slots too), and slots not yet written have segment id 0, so nothing sees them.
    """
    initialized = self.has_variable('cache', 'cached_key')
    batch_size, length = k_BTNH.shape[:2]
    k_BNTH, v_BNTH = jnp.swapaxes(k_BTNH, 1, 2), jnp.swapaxes(v_BTNH, 1, 2)
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, k_BNTH.shape, k_BNTH.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, v_BNTH.shape,
                                 v_BNTH.dtype)
    cached_segment_ids = self.variable('cache', 'cached_segment_ids', jnp.zeros,
                                       (batch_size, length), jnp.int32)
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if not initialized:
      # Inside `init`: the dummy input only gave the cache its shape; nothing is cached.
      return k_BTNH, v_BTNH, None

    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((batch_size, length), jnp.int32)
    index = cache_index.value
    cached_key.value = lax.dynamic_update_slice(
        cached_key.value, k_BNTH.astype(cached_key.value.dtype), (0, 0, index, 0))
    cached_value.value = lax.dynamic_update_slice(
        cached_value.value, v_BNTH.astype(cached_value.value.dtype), (0, 0, index, 0))
    cached_segment_ids.value = lax.dynamic_update_slice(
        cached_segment_ids.value, segment_ids_BT.astype(jnp.int32), (0, index))
    cache_index.value = index + length

    cache_len = cached_key.value.shape[2]
    mask = CausalMask() if self.mask is None else self.mask
    mask_B1TS = (
        mask(sequence_index(batch_size, length, index), sequence_index(batch_size, cache_len),
             prefix_lengths_B=prefix_lengths_B)
        & segment_mask(segment_ids_BT, cached_segment_ids.value))
    # Views in the kernels' [B, S, N, H]; XLA folds the swap into the einsums.
    return (jnp.swapaxes(cached_key.value, 1, 2), jnp.swapaxes(cached_value.value, 1, 2),
            mask_B1TS)
