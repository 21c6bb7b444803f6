"""Relative-position machinery: distances, buckets, biases and relative keys/values.

The positional schemes in positions.py that act inside attention are built from these
pieces. Every one of them reads the positions it needs from a `PositionContext`, built once
per stack (GPT, later the shared encoder/decoder stacks) and handed to every layer:

  * q_positions_BT: position ids of the queries (restarting at 0 per packed document);
  * kv_positions_BS: position ids of the keys: the same array in a plain forward pass, the
    positions cached beside the keys in decode mode (left-padded rows differ per row);
  * shared: what a scheme computes once per stack, e.g. T5's bias `[B, N, T, S]`.

Distances are differences of position ids, never of slots, so a document packed after
another sees the same distances as alone (attention never crosses documents: the segment
mask sees to that), and a cached key keeps the distance it had in the full forward pass.

Dims as in attention.py, plus R (relative buckets, the rows of a relative table).
"""

import functools
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers

Array = jax.Array
Dtype = Any

# As in attention.py: finite, so a fully masked row stays free of NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


@flax.struct.dataclass
class PositionContext:
  """The positions a scheme sees inside attention (see the module docstring)."""
  q_positions_BT: Array
  kv_positions_BS: Array
  shared: Any = None


def relative_distance(context: PositionContext) -> Array:
  """key position - query position, `[B, T, S]` int32 (negative for earlier keys)."""
  return (context.kv_positions_BS[:, None, :] - context.q_positions_BT[:, :, None]).astype(
      jnp.int32)


def _log_offset(distance: Array, exact: int, max_distance: int, buckets: int,
                round_up: bool = False) -> Array:
  """floor (or ceil) of log(d/exact) / log(max_distance/exact) * buckets, in int32."""
  # The maximum guards log(0) in the lanes that `where` later discards.
  ratio = jnp.maximum(distance, exact).astype(jnp.float32) / exact
  scaled = jnp.log(ratio) / math.log(max_distance / exact) * buckets
  return (jnp.ceil(scaled) if round_up else scaled).astype(jnp.int32)


def t5_bucket(relative_BTS: Array, *, bidirectional: bool, num_buckets: int,
              max_distance: int) -> Array:
  """T5's bucket of each relative distance (key - query), in [0, num_buckets).

  Raffel et al. 2020: half the buckets (of one direction) hold the distances 0, 1, ...
  exactly; the rest are log-spaced up to `max_distance`, beyond which all distances share
  the last bucket. Bidirectional: the upper half of the buckets is for keys after the
  query. Causal: keys after the query fall in bucket 0 with the query itself (the mask
  hides them anyway).
  """
  bucket = jnp.zeros_like(relative_BTS)
  distance = -relative_BTS  # How far back the key lies.
  if bidirectional:
    num_buckets //= 2
    bucket += jnp.where(distance < 0, num_buckets, 0)
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  max_exact = num_buckets // 2
  far = max_exact + _log_offset(distance, max_exact, max_distance, num_buckets - max_exact)
  far = jnp.minimum(far, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, far)


def log_bucket_index(relative_BTS: Array, *, num_buckets: int, max_distance: int) -> Array:
  """Row of a `[num_buckets, ...]` table for each signed distance (DeBERTa's log buckets).

  With span = num_buckets // 2 and mid = span // 2 (He et al. 2021, DeBERTa-v2): distances
  up to mid in size keep a bucket of their own; larger ones get log-spaced buckets that
  reach span at `max_distance`; the signed bucket is clipped to [-span, span) and shifted
  by span, so row `span + r` holds the small distance r.
  """
  span = num_buckets // 2
  mid = max(span // 2, 1)
  size = jnp.abs(relative_BTS)
  # Rounding up (as DeBERTa does) gives the first distance past mid a bucket of its own.
  far = mid + _log_offset(size, mid, max_distance, span - mid, round_up=True)
  signed = jnp.where(size <= mid, relative_BTS, jnp.sign(relative_BTS) * far)
  return jnp.clip(signed, -span, span - 1) + span


@functools.cache
def _deberta_v2_thresholds(span: int, max_distance: int) -> np.ndarray:
  """The smallest distance of each of DeBERTa-v2's log buckets past mid (int64 `[span - mid]`).

  Entry k - 1 is the least d with ceil(x(d)) >= k, x(d) = log(d/mid) / log(top/mid) · (mid-1)
  and top = max_distance - 1; that is d^(mid-1) · mid^(k-1) > top^(k-1) · mid^(mid-1), decided
  in exact integers. (Evaluated in float32, x(top) = mid - 1 came out an ulp above or below,
  depending on how XLA compiled the logs: the same distance then fell in different buckets.)
  Buckets that no distance reaches get int32's maximum.
  """
  mid, top = span // 2, max_distance - 1
  never = np.iinfo(np.int32).max
  thresholds = []
  for k in range(1, span - mid + 1):
    reaches = lambda d, k=k: d ** (mid - 1) * mid ** (k - 1) > top ** (k - 1) * mid ** (mid - 1)
    if not reaches(never):
      thresholds.append(never)
      continue
    low, high = mid, never  # reaches(high) and not reaches(low)
    while high - low > 1:
      middle = (low + high) // 2
      low, high = (low, middle) if reaches(middle) else (middle, high)
    thresholds.append(high)
  return np.asarray(thresholds, np.int64)


def deberta_v2_bucket_index(relative_BTS: Array, *, num_buckets: int,
                            max_distance: int) -> Array:
  """Row of a `[num_buckets, ...]` table for each signed distance, as DeBERTa-v2 computes it.

  Microsoft's released code (`make_log_bucket_position`, which transformers repeats): with
  span = num_buckets // 2 (its `position_buckets`) and mid = span // 2, distances up to mid
  in size keep a bucket of their own; a larger one d gets

      mid + ceil(log(d / mid) / log((max_distance - 1) / mid) · (mid - 1))

  so d = max_distance - 1 lands in bucket 2·mid - 1; the signed bucket is clipped to
  [-span, span) and shifted by span. The buckets' edges are computed exactly, once, when
  tracing (`_deberta_v2_thresholds`), so every backend buckets a distance alike.
  """
  span = num_buckets // 2
  mid = span // 2
  thresholds_K = jnp.asarray(np.minimum(_deberta_v2_thresholds(span, max_distance),
                                        np.iinfo(np.int32).max), jnp.int32)
  size = jnp.abs(relative_BTS).astype(jnp.int32)
  far = mid + jnp.searchsorted(thresholds_K, size, side='right').astype(jnp.int32)
  signed = jnp.where(size <= mid, relative_BTS, jnp.sign(relative_BTS) * far)
  return jnp.clip(signed, -span, span - 1) + span


def alibi_slopes(num_heads: int) -> Array:
  """Press et al. 2022: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads.

  For a head count that is not a power of two, the slopes of the nearest smaller power of
  two, then every other slope of the next power of two (the paper's recipe).
  """
  def geometric(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(closest)
  slopes += geometric(2 * closest)[0::2][:num_heads - closest]
  return jnp.asarray(slopes, jnp.float32)


def gather_relative(x_BNTR: Array, index_BTS: Array) -> Array:
  """`x[b, n, t, index[b, t, s]]`: per-bucket scores spread over the keys, `[B, N, T, S]`.

  The scores are computed once per bucket (R of them, not S), then gathered.
  """
  return jnp.take_along_axis(x_BNTR, index_BTS[:, None], axis=-1)


# The factor each dot-product score multiplies q·k by, which the relative terms share.
_DOT_SCALES = {'scaled_dot': lambda head_dim: 1.0 / math.sqrt(head_dim),
               'dot': lambda head_dim: 1.0}


def dot_scale(score: str, head_dim: int) -> float:
  """The scale of the dot-product score `score`; other scores have no q·k to add to."""
  if score not in _DOT_SCALES:
    raise ValueError(f'relative keys add to a dot-product score ({", ".join(_DOT_SCALES)}), '
                     f'not {score!r}')
  return _DOT_SCALES[score](head_dim)


# --------------------------------------------------------------------------- modules


class T5Bias(nn.Module):
  """A learned scalar per bucket and head, shared by every layer of a stack (T5).

  Attributes:
    num_heads: N.
    num_buckets: rows of the table.
    max_distance: distances beyond it share the last bucket.
    bidirectional: whether keys after the query get buckets of their own.
    param_dtype: storage dtype of the table.
  """
  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, context: PositionContext) -> Array:
    table_RN = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'heads')),
        (self.num_buckets, self.num_heads), self.param_dtype)
    bucket_BTS = t5_bucket(relative_distance(context), bidirectional=self.bidirectional,
                           num_buckets=self.num_buckets, max_distance=self.max_distance)
    bias_BTSN = jnp.take(table_RN.astype(jnp.float32), bucket_BTS, axis=0)
    return jnp.transpose(bias_BTSN, (0, 3, 1, 2))


def _table(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           param_dtype: Dtype) -> Array:
  return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                      shape, param_dtype)


class ShawAttention(nn.Module):
  """Attention with learned relative keys and values (Shaw et al. 2018).

      e_ij = q_i·(k_j + a^K_ij) * scale,   z_i = sum_j softmax_j(e_ij) (v_j + a^V_ij)
      a^K_ij = w^K[clip(j - i, -k, k)],    a^V_ij = w^V[clip(j - i, -k, k)]

  The tables `[2k + 1, H]` are per layer and shared by the heads, as in the paper. Instead
  of a `[B, T, S, H]` tensor of relative keys, q meets the 2k+1 table rows once and the
  scores are gathered per key; the relative values sum the probabilities per bucket first.
  The values term needs the probabilities, so this runs its own einsums (the 'xla' kernel's
  computation) rather than a fused kernel.

  Attributes:
    window: k, the clipping distance.
    param_dtype: storage dtype of the tables.
  """
  window: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_BTNH: Array, k_BSNH: Array, v_BSNH: Array, context: PositionContext, *,
               mask_B1TS: Array | None, score: str,
               dropout: Callable[[Array], Array] | None) -> Array:
    head_dim = q_BTNH.shape[-1]
    rows = 2 * self.window + 1
    key_RH = _table(self, 'key_table', (rows, head_dim), (None, 'kv'), self.param_dtype)
    value_RH = _table(self, 'value_table', (rows, head_dim), (None, 'kv'), self.param_dtype)
    index_BTS = jnp.clip(relative_distance(context), -self.window, self.window) + self.window

    scale = dot_scale(score, head_dim)
    qa_BNTR = jnp.einsum('btnh,rh->bntr', q_BTNH, key_RH.astype(q_BTNH.dtype),
                         preferred_element_type=jnp.float32)
    logits_BNTS = jnp.einsum('btnh,bsnh->bnts', q_BTNH, k_BSNH,
                             preferred_element_type=jnp.float32)
    logits_BNTS = (logits_BNTS + gather_relative(qa_BNTR, index_BTS)) * scale
    if mask_B1TS is not None:
      logits_BNTS = jnp.where(mask_B1TS, logits_BNTS, _MASKED)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
    if mask_B1TS is not None:
      probs_BNTS = jnp.where(jnp.any(mask_B1TS, axis=-1, keepdims=True), probs_BNTS, 0.0)
    if dropout is not None:
      probs_BNTS = dropout(probs_BNTS)

    # sum_j p_ij w^V[r_ij] = sum_r (sum_{j: r_ij = r} p_ij) w^V[r]: a scatter-add of the
    # probabilities into R buckets, then a small matmul.
    batch, heads, length, _ = probs_BNTS.shape
    b_B111 = jnp.arange(batch)[:, None, None, None]
    n_1N11 = jnp.arange(heads)[None, :, None, None]
    t_11T1 = jnp.arange(length)[None, None, :, None]
    bucket_probs_BNTR = jnp.zeros((batch, heads, length, rows), jnp.float32).at[
        b_B111, n_1N11, t_11T1, index_BTS[:, None]].add(probs_BNTS)
    out_BTNH = jnp.einsum('bnts,bsnh->btnh', probs_BNTS.astype(v_BSNH.dtype), v_BSNH)
    out_BTNH += jnp.einsum('bntr,rh->btnh', bucket_probs_BNTR.astype(v_BSNH.dtype),
                           value_RH.astype(v_BSNH.dtype))
    return out_BTNH


class RelativeEmbedding(nn.Module):
  """DeBERTa's relative position embeddings `[R, D]`, shared by the layers of a stack.

  DeBERTa-v2 normalises the table before every use (`norm_rel_ebd='layer_norm'`); the
  stack computes it once per forward pass and hands it to every layer.

  Attributes:
    num_buckets: R.
    features: D.
    norm_epsilon: the LayerNorm's epsilon, or None for the raw table.
    dtype: dtype of the returned table.
    param_dtype: its storage dtype.
  """
  num_buckets: int
  features: int
  norm_epsilon: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    table_RD = _table(self, 'embedding', (self.num_buckets, self.features), (None, 'embed'),
                      self.param_dtype)
    if self.norm_epsilon is not None:
      table_RD = layers.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name='norm')(table_RD)
    return table_RD.astype(self.dtype)


DISENTANGLED_TERMS = ('c2p', 'p2c')


class DisentangledBias(nn.Module):
  """DeBERTa's content->position and position->content terms (He et al. 2021), `[B, N, T, S]`.

      c2p_ij = q_i · K^r[δ_c2p(i, j)],   p2c_ij = k_j · Q^r[δ_p2c(i, j)]
      K^r = P W_{k,r},                   Q^r = P W_{q,r}

  P `[R, D]` is the relative embedding table shared by the layers (`context.shared`).
  Two readings of the indices:
    * the paper's equation (`v2=False`): δ_c2p = δ(i, j), δ_p2c = δ(j, i), with
      δ(i, j) = `log_bucket_index(i - j)`;
    * DeBERTa-v2 as released (`v2=True`; Microsoft's code and transformers): both terms
      read δ(i, j) = `deberta_v2_bucket_index(i - j)`. (The code negates the p2c index,
      gathers along the keys and transposes, which lands on δ(i, j), not δ(j, i).)
  The projections are the layer's own (`share_att_key`, DeBERTa-v2: W_{k,r} = W_k and
  W_{q,r} = W_q, biases included) or separate ones per layer, 'position_key' and
  'position_query' (D -> N, H, no bias). Only the terms named in `terms` are computed;
  the sum is returned unscaled.

  Attributes:
    num_buckets: R.
    max_distance: where the log buckets end.
    terms: a subset of DISENTANGLED_TERMS.
    v2: DeBERTa-v2's buckets and p2c index (above).
    share_att_key: project P with the hosting attention layer's 'query' and 'key'.
    dtype: compute dtype of the projections.
    param_dtype: storage dtype of the projections.
  """
  num_buckets: int
  max_distance: int
  terms: tuple[str, ...] = DISENTANGLED_TERMS
  v2: bool = False
  share_att_key: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_BTNH: Array, k_BSNH: Array, context: PositionContext) -> Array:
    heads, head_dim = q_BTNH.shape[-2:]
    table_RD = context.shared

    def project(name):
      if self.share_att_key:
        return self._layer_projection(name, table_RD)
      return nn.DenseGeneral(
          features=(heads, head_dim), axis=-1, use_bias=False, dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   ('embed', 'heads', 'kv')),
          name=f'position_{name}')(table_RD)

    relative_BTS = -relative_distance(context)  # i - j, DeBERTa's sign.
    if self.v2:
      c2p_index_BTS = p2c_index_BTS = deberta_v2_bucket_index(
          relative_BTS, num_buckets=self.num_buckets, max_distance=self.max_distance)
    else:
      c2p_index_BTS, p2c_index_BTS = (
          log_bucket_index(r_BTS, num_buckets=self.num_buckets, max_distance=self.max_distance)
          for r_BTS in (relative_BTS, -relative_BTS))
    terms_BNTS = jnp.zeros((), jnp.float32)
    if 'c2p' in self.terms:
      c2p_BNTR = jnp.einsum('btnh,rnh->bntr', q_BTNH, project('key'),
                            preferred_element_type=jnp.float32)
      terms_BNTS = terms_BNTS + gather_relative(c2p_BNTR, c2p_index_BTS)
    if 'p2c' in self.terms:
      # p2c_ij = (k_j · Q^r[r])[r = δ_p2c(i, j)]: gather the bucket axis per (query, key).
      p2c_BNRS = jnp.einsum('bsnh,rnh->bnrs', k_BSNH, project('query'),
                            preferred_element_type=jnp.float32)
      terms_BNTS = terms_BNTS + jnp.take_along_axis(p2c_BNRS, p2c_index_BTS[:, None], axis=2)
    return terms_BNTS

  def _layer_projection(self, name: str, table_RD: Array) -> Array:
    """The hosting attention layer's projection `name` ('query' or 'key') of the table.

    This module is built inside MultiHeadAttention after its q/k/v projections, so their
    parameters are there to read: sharing them this way keeps a single copy.
    """
    params = self.parent.variables.get('params', {}) if self.parent is not None else {}
    if name not in params:
      raise ValueError(f'share_att_key needs the {name!r} projection of the attention layer '
                       'that hosts the disentangled terms; none was found')
    kernel_DNH = nn.unbox(params[name]['kernel'])
    y_RNH = jnp.einsum('rd,dnh->rnh', table_RD.astype(self.dtype),
                       kernel_DNH.astype(self.dtype))
    if 'bias' in params[name]:
      y_RNH = y_RNH + nn.unbox(params[name]['bias']).astype(self.dtype)
    return y_RNH
