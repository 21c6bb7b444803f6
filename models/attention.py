"""Multi-head attention with its masks, scores and kernels, shared by every model family.

Dimension legend (tensors carry their shape as a suffix, e.g. `q_BTNH`):
  B  batch
  T  query length (target)
  S  key/value length (source); in decode mode, the length of the cache
  N  attention heads
  H  width of one head
  D  model (embedding) width

    attention(q, k, v) = softmax(score(q, k) + bias, where mask) · v

Two parts are picked by name from small registries, so variants plug in without branching:
  * SCORES: how a query and a key become a logit ('scaled_dot', 'dot'; additive scores
    and relative-position biases register here later);
  * KERNELS: how the whole computation runs: 'xla' (explicit einsums, the reference) or
    'cudnn' (the fused kernel behind `jax.nn.dot_product_attention`).

Masks are boolean `[B, 1, T, S]` arrays, True where a query may attend to a key, and are
combined with `&`. A query row with no visible key (padding) yields zeros, never NaN.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Protocol

from absl import logging
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

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


def sequence_index(batch_size: int, length: int, offset: Array | int = 0) -> Array:
  """`offset + [0, 1, ..., length-1]` for every row: `[B, T]` int32 slots."""
  index_T = offset + jnp.arange(length, dtype=jnp.int32)
  return jnp.broadcast_to(index_T, (batch_size, length))


def _has_visible_key(mask_B1TS: Array) -> Array:
  """`[B, 1, T, 1]`: whether each query row may attend to anything at all."""
  return jnp.any(mask_B1TS, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- scores


class Score(Protocol):
  """Maps queries and keys to float32 logits `[B, N, T, S]`."""

  def __call__(self, q_BTNH: Array, k_BSNH: Array) -> Array:
    ...


@dataclasses.dataclass(frozen=True)
class DotProductScore:
  """q·k, divided by sqrt(H) when `scaled` (Vaswani et al. 2017, eq. 1)."""
  scaled: bool = True

  def scale(self, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if self.scaled else 1.0

  def __call__(self, q_BTNH: Array, k_BSNH: Array) -> Array:
    # Accumulate in float32 even for bfloat16 inputs: the softmax needs the precision.
    logits_BNTS = jnp.einsum('btnh,bsnh->bnts', q_BTNH, k_BSNH,
                             preferred_element_type=jnp.float32)
    return logits_BNTS * self.scale(q_BTNH.shape[-1])


SCORES: dict[str, Score] = {
    'scaled_dot': DotProductScore(scaled=True),
    'dot': DotProductScore(scaled=False),
}


def register_score(name: str, score: Score) -> None:
  """Makes `score` selectable as `MultiHeadAttention(score=name)`."""
  SCORES[name] = score


def get_score(name: str) -> Score:
  if name not in SCORES:
    raise ValueError(f'unknown attention score {name!r} (known: {", ".join(sorted(SCORES))})')
  return SCORES[name]


# --------------------------------------------------------------------------- kernels


class Kernel(Protocol):
  """Computes attention outputs `[B, T, N, H]` from projected queries, keys and values.

  `dropout` (or None) is applied to the attention probabilities; `bias_BNTS` is added to
  the logits (relative positions, ALiBi). Query rows without a visible key give zeros.
  """

  def __call__(self, q_BTNH: Array, k_BSNH: Array, v_BSNH: Array, *, score: Score,
               mask_B1TS: Array | None, bias_BNTS: Array | None,
               dropout: Callable[[Array], Array] | None) -> Array:
    ...


def xla_kernel(q_BTNH, k_BSNH, v_BSNH, *, score, mask_B1TS=None, bias_BNTS=None,
               dropout=None):
  """The equation as explicit einsums; any score, dropout on the probabilities."""
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
                 dropout=None):
  """`jax.nn.dot_product_attention` with cuDNN; XLA's version where cuDNN cannot run."""
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
           bias_BNTS: Array | None = None, score: str = 'scaled_dot', kernel: str = 'xla',
           dropout: Callable[[Array], Array] | None = None) -> Array:
  """Attention of projected heads, with score and kernel picked by name: `[B, T, N, H]`."""
  if kernel not in KERNELS:
    raise ValueError(f'unknown attention kernel {kernel!r} (known: {", ".join(sorted(KERNELS))})')
  return KERNELS[kernel](q_BTNH, k_BSNH, v_BSNH, score=get_score(score), mask_B1TS=mask_B1TS,
                         bias_BNTS=bias_BNTS, dropout=dropout)


# ---------------------------------------------------------------------------- module


class MultiHeadAttention(nn.Module):
  """Multi-head attention: q/k/v projections D -> (N, H), attention, output (N, H) -> D.

  Attributes:
    num_heads: N.
    head_dim: H.
    dtype: compute dtype; logits and softmax are float32 regardless.
    param_dtype: storage dtype of the parameters.
    dropout_rate: dropout on the attention probabilities and on the output.
    score: a name in SCORES.
    kernel: a name in KERNELS.
    use_bias: whether the projections have biases (GPT-2 and BERT do, T5 does not).
    kernel_init: initializer of the q/k/v projections.
    out_kernel_init: initializer of the output projection (GPT-2 scales it by depth).
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

  @nn.compact
  def __call__(self, x_BTD: Array, kv_BSD: Array | None = None, *,
               mask_B1TS: Array | None = None, segment_ids_BT: Array | None = None,
               deterministic: bool = True, decode: bool = False) -> Array:
    """Attends from `x_BTD` to itself, or to `kv_BSD` (cross-attention).

    Args:
      x_BTD: the queries' inputs (and keys'/values' for self-attention).
      kv_BSD: the keys'/values' inputs for cross-attention; None for self-attention.
      mask_B1TS: boolean mask, True = may attend. Not used in decode mode.
      segment_ids_BT: decode mode only: segment ids of the new tokens (0 = padding),
        cached beside their keys so that later queries skip padded slots.
      deterministic: disables dropout.
      decode: causal self-attention over a KV cache in the 'cache' collection. The first
        call (inside `init`) shapes the cache from `x_BTD` as `[B, S_max, ...]`; each later
        call writes a chunk of T >= 1 new tokens at `cache_index` and attends to every
        cached slot up to its own (and of the same segment).

    Returns:
      `[B, T, D]` in `dtype`.
    """
    if mask_B1TS is not None and decode:
      raise ValueError('decode mode builds its mask from the cache; pass segment_ids_BT '
                       'to mask padding instead of mask_B1TS')
    if segment_ids_BT is not None and not decode:
      raise ValueError('segment_ids_BT is for decode mode; otherwise fold segments into '
                       'mask_B1TS with segment_mask()')
    if kv_BSD is not None and decode:
      raise NotImplementedError('decode mode caches self-attention only')
    kv_BSD = x_BTD if kv_BSD is None else kv_BSD

    q_BTNH = self._project_in('query', x_BTD)
    k_BSNH = self._project_in('key', kv_BSD)
    v_BSNH = self._project_in('value', kv_BSD)
    if decode:
      k_BSNH, v_BSNH, mask_B1TS = self._update_cache(k_BSNH, v_BSNH, segment_ids_BT)

    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      dropout = functools.partial(nn.Dropout(self.dropout_rate, name='attention_dropout'),
                                  deterministic=False)
    out_BTNH = attend(q_BTNH, k_BSNH, v_BSNH, mask_B1TS=mask_B1TS, score=self.score,
                      kernel=self.kernel, dropout=dropout)
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

  def _update_cache(self, k_BTNH: Array, v_BTNH: Array,
                    segment_ids_BT: Array | None) -> tuple[Array, Array, Array | None]:
    """Writes the new keys/values at `cache_index`; returns the whole cache and its mask.

    The cache is `[B, S_max, N, H]` with one shared `cache_index`: batched prompts of
    different lengths are left-padded, their padding marked by segment id 0. Writing past
    S_max is not checked (XLA clamps the slice): size the cache for the whole generation.
    """
    initialized = self.has_variable('cache', 'cached_key')
    batch_size, length = k_BTNH.shape[:2]
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, k_BTNH.shape, k_BTNH.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, v_BTNH.shape,
                                 v_BTNH.dtype)
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
        cached_key.value, k_BTNH.astype(cached_key.value.dtype), (0, index, 0, 0))
    cached_value.value = lax.dynamic_update_slice(
        cached_value.value, v_BTNH.astype(cached_value.value.dtype), (0, index, 0, 0))
    cached_segment_ids.value = lax.dynamic_update_slice(
        cached_segment_ids.value, segment_ids_BT.astype(jnp.int32), (0, index))
    cache_index.value = index + length

    cache_len = cached_key.value.shape[1]
    mask_B1TS = (
        causal_mask(sequence_index(batch_size, length, index),
                    sequence_index(batch_size, cache_len))
        & segment_mask(segment_ids_BT, cached_segment_ids.value))
    return cached_key.value, cached_value.value, mask_B1TS
