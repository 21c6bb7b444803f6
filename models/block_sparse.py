"""Block-sparse attention: only the blocks of a block-structured mask are computed.

Registered as the attention kernel 'block_sparse'. Queries and keys are cut into blocks of
b slots; the mask's `block_layout` says which key blocks each query block sees (BigBird:
window, global and random blocks; a sliding window: its neighbours). For every query
block the kernel gathers its K kept key blocks and attends over those K·b keys only:

    cost O(T · K · b) instead of O(T · S)        (K = 2·window + 1 + global + random)

linear in T for a fixed pattern. Query blocks that see every key block (BigBird's global
blocks) attend densely over all S keys, which is linear in S too. Within a kept block the
mask's `local_mask` (causal on the diagonal, the exact window) and the caller's `mask_B1TS`
(padding, packed segments), gathered blockwise, still apply, so the result equals the
dense kernels under the same mask. `mask_B1TS` is optional: without it the pattern alone
masks, and nothing of size T·S is built.

Dims as in attention.py, plus b (block size), R (query blocks), K (kept key blocks per
query block), C (key blocks in all).
"""

import jax
import jax.numpy as jnp
import numpy as np

from models import attention

Array = jax.Array


def _gather_plan(layout_RC: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray]:
  """Splits the query blocks into dense rows and sparse rows with their key blocks.

  Returns (dense rows, sparse rows, key blocks `[R, K]` of each sparse row, whether each of
  those is real `[R, K]`). Rows keep fewer than K blocks pad with block 0, marked unreal:
  a repeated block must not count twice in the softmax.
  """
  full_R = layout_RC.all(axis=1)
  dense_rows = np.flatnonzero(full_R)
  sparse_rows = np.flatnonzero(~full_R)
  counts_R = layout_RC[sparse_rows].sum(axis=1)
  width = max(int(counts_R.max(initial=0)), 1)
  blocks_RK = np.zeros((sparse_rows.size, width), np.int32)
  real_RK = np.zeros((sparse_rows.size, width), bool)
  for i, row in enumerate(sparse_rows):
    kept = np.flatnonzero(layout_RC[row])
    blocks_RK[i, :kept.size] = kept
    real_RK[i, :kept.size] = True
  return dense_rows, sparse_rows, blocks_RK, real_RK


def _pad_to(x: Array, length: int, axis: int) -> Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _gather_blocks(x_BXTS: Array, rows_R: np.ndarray, blocks_RK: np.ndarray,
                   block_size: int) -> Array:
  """`[B, X, T', S']` -> `[B, R, X, b, K·b]`: the kept (query, key) blocks of a mask or bias."""
  batch, extra, q_len, kv_len = x_BXTS.shape
  b = block_size
  x_BXRbCb = x_BXTS.reshape(batch, extra, q_len // b, b, kv_len // b, b)
  x_BRCXbb = x_BXRbCb.transpose(0, 2, 4, 1, 3, 5)
  x_BRKXbb = x_BRCXbb[:, rows_R[:, None], blocks_RK]
  x_BRXbKb = x_BRKXbb.transpose(0, 1, 3, 4, 2, 5)
  return x_BRXbKb.reshape(batch, len(rows_R), extra, b, blocks_RK.shape[1] * b)


def block_sparse_kernel(q_BTNH, k_BSNH, v_BSNH, *, score, mask_B1TS=None, bias_BNTS=None,
                        dropout=None, pattern=None):
  """Attention over the blocks of `pattern` only; any score, bias and dropout.

  Without a pattern (decode mode: the queries' slots in the cache are traced, so their
  blocks are unknown when compiling) this is the 'xla' kernel over `mask_B1TS`, which
  then already holds the pattern's mask over the cache: decoding is dense over the cache.
  """
  if pattern is None:
    return attention.xla_kernel(q_BTNH, k_BSNH, v_BSNH, score=score, mask_B1TS=mask_B1TS,
                                bias_BNTS=bias_BNTS, dropout=dropout)
  if not hasattr(pattern, 'block_layout'):
    raise ValueError(f"kernel 'block_sparse' needs a block-structured mask such as "
                     f"'bigbird' or 'sliding_window', not {pattern!r}")
  batch, q_len, num_heads, head_dim = q_BTNH.shape
  kv_len = k_BSNH.shape[1]
  b = pattern.block_size
  num_q_blocks, num_kv_blocks = -(-q_len // b), -(-kv_len // b)
  t_pad, s_pad = num_q_blocks * b, num_kv_blocks * b
  dense_rows, sparse_rows, blocks_RK, real_RK = _gather_plan(
      pattern.block_layout(num_q_blocks, num_kv_blocks))

  # Pad to whole blocks; padded keys are masked below, padded queries dropped at the end.
  q_BTNH, k_BSNH, v_BSNH = (_pad_to(q_BTNH, t_pad, 1), _pad_to(k_BSNH, s_pad, 1),
                            _pad_to(v_BSNH, s_pad, 1))
  if mask_B1TS is not None:
    mask_B1TS = _pad_to(_pad_to(mask_B1TS, t_pad, 2), s_pad, 3)
  if bias_BNTS is not None:
    bias_BNTS = _pad_to(_pad_to(bias_BNTS, t_pad, 2), s_pad, 3)
  q_index_1T = attention.sequence_index(1, t_pad)
  kv_index_1S = attention.sequence_index(1, s_pad)
  kv_real_111S = (kv_index_1S < kv_len)[:, None, None, :]

  out_BRbNH = jnp.zeros((batch, num_q_blocks, b, num_heads, head_dim), v_BSNH.dtype)
  q_BRbNH = q_BTNH.reshape(batch, num_q_blocks, b, num_heads, head_dim)

  if dense_rows.size:
    # Rows that see every key block: plain attention of their queries over all keys.
    slots = (dense_rows[:, None] * b + np.arange(b)).reshape(-1)
    mask_B1XS = pattern.local_mask(q_index_1T[:, slots], kv_index_1S) & kv_real_111S
    if mask_B1TS is not None:
      mask_B1XS = mask_B1XS & mask_B1TS[:, :, slots]
    out_BXNH = attention.xla_kernel(
        q_BTNH[:, slots], k_BSNH, v_BSNH, score=score, mask_B1TS=mask_B1XS,
        bias_BNTS=None if bias_BNTS is None else bias_BNTS[:, :, slots], dropout=dropout)
    out_BRbNH = out_BRbNH.at[:, dense_rows].set(
        out_BXNH.reshape(batch, dense_rows.size, b, num_heads, head_dim))

  if sparse_rows.size:
    rows, width = sparse_rows.size, blocks_RK.shape[1]
    # The kept key blocks of every sparse query block, batched as B·R independent problems.
    k_BRKbNH = k_BSNH.reshape(batch, num_kv_blocks, b, num_heads, head_dim)[:, blocks_RK]
    v_BRKbNH = v_BSNH.reshape(batch, num_kv_blocks, b, num_heads, head_dim)[:, blocks_RK]
    q_index_Rb = jnp.asarray(sparse_rows[:, None] * b + np.arange(b), jnp.int32)
    kv_index_RKb = jnp.asarray(blocks_RK[:, :, None] * b + np.arange(b), jnp.int32)
    kv_index_RKb = kv_index_RKb.reshape(rows, width * b)
    real_RKb = jnp.asarray(np.repeat(real_RK, b, axis=1))
    mask_R1bKb = (pattern.local_mask(q_index_Rb, kv_index_RKb)
                  & (real_RKb & (kv_index_RKb < kv_len))[:, None, None, :])
    mask_BR1bKb = jnp.broadcast_to(mask_R1bKb, (batch,) + mask_R1bKb.shape)
    if mask_B1TS is not None:
      mask_BR1bKb = mask_BR1bKb & _gather_blocks(mask_B1TS, sparse_rows, blocks_RK, b)
    bias_XNbKb = None
    if bias_BNTS is not None:
      bias_BRNbKb = _gather_blocks(jnp.broadcast_to(bias_BNTS, (batch,) + bias_BNTS.shape[1:]),
                                   sparse_rows, blocks_RK, b)
      bias_XNbKb = bias_BRNbKb.reshape((batch * rows,) + bias_BRNbKb.shape[2:])
    out_XbNH = attention.xla_kernel(
        q_BRbNH[:, sparse_rows].reshape(batch * rows, b, num_heads, head_dim),
        k_BRKbNH.reshape(batch * rows, width * b, num_heads, head_dim),
        v_BRKbNH.reshape(batch * rows, width * b, num_heads, head_dim), score=score,
        mask_B1TS=mask_BR1bKb.reshape(batch * rows, 1, b, width * b), bias_BNTS=bias_XNbKb,
        dropout=dropout)
    out_BRbNH = out_BRbNH.at[:, sparse_rows].set(
        out_XbNH.reshape(batch, rows, b, num_heads, head_dim))

  return out_BRbNH.reshape(batch, t_pad, num_heads, head_dim)[:, :q_len]


attention.register_kernel('block_sparse', block_sparse_kernel)
