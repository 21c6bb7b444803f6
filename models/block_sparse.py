"""Block-sparse attention: only the blocks of a block-structured mask are computed.

Registered as the attention kernel 'block_sparse'. Queries and keys are cut into blocks of
b slots; the mask's `block_layout` says which key blocks each query block sees (BigBird:
window, global and random blocks; a sliding window: its neighbours). Every query block
attends over its K kept key blocks only:

    cost O(T · K · b) instead of O(T · S)        (K = 2·window + 1 + global + random)

linear in T for a fixed pattern. Query blocks that see every key block (BigBird's global
blocks) attend densely over all S keys, which is linear in S too. Within a kept block the
mask's `local_mask` (causal on the diagonal, the exact window) and the caller's `mask_B1TS`
(padding, packed segments), gathered blockwise, still apply, so the result equals the
dense kernels under the same mask. `mask_B1TS` is optional: without it the pattern alone
masks, and nothing of size T·S is built.

The kept blocks are laid out as K columns, one key block per query block in each, so that
most columns are plain slices of the keys: 'query block i sees key block i - d' (a
window's diagonals) is the keys shifted by d blocks, 'every query block sees key block c'
(BigBird's global blocks) a broadcast, and only what is left (BigBird's random blocks) is
gathered by index. Each column gets its own b x b score and value products, so no array
holds K copies of the keys side by side and no product has an operand K times the size of
q: the gradients are pads and sums rather than scatter-adds into K·b-wide copies, and the
matrix multiplies' packing scratch stays small (see docs/attention_bench.md).

Dims as in attention.py, plus b (block size), R (query blocks), K (kept key blocks per
query block: columns), C (key blocks in all), X (batch x query blocks).
"""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from models import attention

Array = jax.Array
# The 'xla' kernel's masking, which the sparse rows reproduce exactly.
_MASKED = attention._MASKED  # pylint: disable=protected-access
_has_visible_key = attention._has_visible_key  # pylint: disable=protected-access


def _pack(left_RC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each row's kept blocks packed left `[R, K]` (padded with block 0), and which are real."""
  width = max(int(left_RC.sum(axis=1).max(initial=0)), 1)
  blocks_RK = np.zeros((left_RC.shape[0], width), np.int64)
  real_RK = np.zeros((left_RC.shape[0], width), bool)
  for i, row_C in enumerate(left_RC):
    kept = np.flatnonzero(row_C)
    blocks_RK[i, :kept.size] = kept
    real_RK[i, :kept.size] = True
  return blocks_RK, real_RK


def _gather_plan(layout_RC: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray]:
  """Splits the query blocks into dense rows and sparse rows with their key blocks.

  Returns (dense rows, sparse rows, key block `[R, K]` of each sparse row in each of K
  columns, whether each of those is real `[R, K]`). Every kept block of a row is real in
  exactly one column; the others are masked, since a repeated block must not count twice
  in the softmax. Columns are, greedily by how many rows they serve while that is at least
  half of them, diagonals (key block = query block - d; blocks outside 0..C-1 are unreal)
  or constant blocks; what no such column serves is packed left, padded with block 0.
  K is never more than the most blocks a row keeps: columns that would make it so are
  given up, the least used first.
  """
  full_R = layout_RC.all(axis=1)
  dense_rows = np.flatnonzero(full_R)
  sparse_rows = np.flatnonzero(~full_R)
  left_RC = layout_RC[sparse_rows]
  rows, num_kv_blocks = left_RC.shape
  offset_RC = sparse_rows[:, None] - np.arange(num_kv_blocks)[None, :]  # >= -C + 1
  chosen = []  # (key block of each row [R], the blocks it serves [R, C])
  while rows:
    per_offset = np.bincount(offset_RC[left_RC] + num_kv_blocks,
                             minlength=len(layout_RC) + num_kv_blocks)
    per_block = left_RC.sum(axis=0)
    if 2 * max(per_offset.max(initial=0), per_block.max(initial=0)) < rows:
      break
    if per_offset.max() >= per_block.max():
      offset = int(per_offset.argmax()) - num_kv_blocks
      blocks_R, hit_RC = sparse_rows - offset, left_RC & (offset_RC == offset)
    else:
      block = int(per_block.argmax())
      blocks_R = np.full(rows, block)
      hit_RC = left_RC & (np.arange(num_kv_blocks) == block)[None, :]
    chosen.append((blocks_R, hit_RC))
    left_RC = left_RC & ~hit_RC
  most = max(int(layout_RC[sparse_rows].sum(axis=1).max(initial=0)), 1)
  while True:
    rest_RK, rest_real_RK = _pack(left_RC)
    if chosen and not rest_real_RK.any():
      rest_RK, rest_real_RK = rest_RK[:, :0], rest_real_RK[:, :0]
    if len(chosen) + rest_RK.shape[1] <= most:
      break
    left_RC = left_RC | chosen.pop()[1]
  blocks_RK = np.concatenate(
      [np.array([c for c, _ in chosen], np.int64).T.reshape(rows, len(chosen)), rest_RK], axis=1)
  real_RK = np.concatenate(
      [np.array([h.any(axis=1) for _, h in chosen], bool).T.reshape(rows, len(chosen)),
       rest_real_RK], axis=1)
  return dense_rows, sparse_rows, blocks_RK.astype(np.int32), real_RK


def _take(x: Array, index: np.ndarray, axis: int) -> Array:
  """`x`'s entries at the static, in-bounds `index` along `axis`.

  A run of consecutive indices is a slice and a repeated index a broadcast, whose
  gradients are a pad and a sum; anything else is a gather (its gradient a scatter-add).
  """
  index = np.asarray(index)
  start = int(index[0]) if index.size else 0
  if (index == start + np.arange(index.size)).all():
    return lax.slice_in_dim(x, start, start + index.size, axis=axis)
  if (index == start).all():
    shape = list(x.shape)
    shape[axis] = index.size
    return jnp.broadcast_to(lax.slice_in_dim(x, start, start + 1, axis=axis), shape)
  where = (slice(None),) * axis + (jnp.asarray(index, jnp.int32),)
  return x.at[where].get(mode='promise_in_bounds',
                         indices_are_sorted=bool((np.diff(index) >= 0).all()),
                         unique_indices=np.unique(index).size == index.size)


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
  outs_BXbNH = []  # The dense rows' outputs, then the sparse rows'.

  if dense_rows.size:
    # Rows that see every key block: plain attention of their queries over all keys.
    slots = (dense_rows[:, None] * b + np.arange(b)).reshape(-1)
    mask_B1XS = pattern.local_mask(_take(q_index_1T, slots, 1), kv_index_1S) & kv_real_111S
    if mask_B1TS is not None:
      mask_B1XS = mask_B1XS & _take(mask_B1TS, slots, 2)
    out_BXNH = attention.xla_kernel(
        _take(q_BTNH, slots, 1), k_BSNH, v_BSNH, score=score, mask_B1TS=mask_B1XS,
        bias_BNTS=None if bias_BNTS is None else _take(bias_BNTS, slots, 2), dropout=dropout)
    outs_BXbNH.append(out_BXNH.reshape(batch, dense_rows.size, b, num_heads, head_dim))

  if sparse_rows.size:
    rows, width = blocks_RK.shape
    problems = batch * rows  # B·R independent problems of b queries over K·b keys.
    # Diagonal columns run off the ends of the keys: pad with (masked) zero blocks.
    before = max(0, -int(blocks_RK.min()))
    after = max(0, int(blocks_RK.max()) - (num_kv_blocks - 1))

    def columns(x_BSNH):
      """The K columns of kept key blocks: `[B·R, b, N, H]` each."""
      x_BCbNH = x_BSNH.reshape(batch, num_kv_blocks, b, num_heads, head_dim)
      x_BCbNH = jnp.pad(x_BCbNH, ((0, 0), (before, after), (0, 0), (0, 0), (0, 0)))
      return [_take(x_BCbNH, blocks_RK[:, j] + before, 1).reshape(problems, b, num_heads,
                                                                   head_dim)
              for j in range(width)]

    q_XbNH = _take(q_BTNH.reshape(batch, num_q_blocks, b, num_heads, head_dim), sparse_rows,
                   1).reshape(problems, b, num_heads, head_dim)
    q_index_Rb = jnp.asarray(sparse_rows[:, None] * b + np.arange(b), jnp.int32)
    kv_index_RKb = jnp.asarray(blocks_RK[:, :, None] * b + np.arange(b), jnp.int32)
    kv_index_RKb = kv_index_RKb.reshape(rows, width * b)
    real_RKb = jnp.asarray(np.repeat(real_RK, b, axis=1))
    mask_R1bKb = (pattern.local_mask(q_index_Rb, kv_index_RKb)
                  & (real_RKb & (kv_index_RKb < kv_len))[:, None, None, :])
    mask_BR1bKb = jnp.broadcast_to(mask_R1bKb, (batch,) + mask_R1bKb.shape)
    in_range_RK = np.clip(blocks_RK, 0, num_kv_blocks - 1)  # Unreal blocks: any will do.
    if mask_B1TS is not None:
      mask_BR1bKb = mask_BR1bKb & _gather_blocks(mask_B1TS, sparse_rows, in_range_RK, b)
    mask_X1bKb = mask_BR1bKb.reshape(problems, 1, b, width * b)

    # As attention.xla_kernel, with keys and values in K columns.
    logits_XNbKb = jnp.concatenate([score(q_XbNH, k_XbNH) for k_XbNH in columns(k_BSNH)],
                                   axis=-1)
    if bias_BNTS is not None:
      bias_BRNbKb = _gather_blocks(jnp.broadcast_to(bias_BNTS, (batch,) + bias_BNTS.shape[1:]),
                                   sparse_rows, in_range_RK, b)
      logits_XNbKb = logits_XNbKb + bias_BRNbKb.reshape(
          (problems,) + bias_BRNbKb.shape[2:]).astype(jnp.float32)
    logits_XNbKb = jnp.where(mask_X1bKb, logits_XNbKb, _MASKED)
    probs_XNbKb = jax.nn.softmax(logits_XNbKb, axis=-1)
    probs_XNbKb = jnp.where(_has_visible_key(mask_X1bKb), probs_XNbKb, 0.0)
    if dropout is not None:
      probs_XNbKb = dropout(probs_XNbKb)
    # Split, not sliced: the gradient is then one concatenation, not K padded copies. The
    # K products are summed in float32 and rounded once, as one product over K·b keys is.
    probs_K_XNbb = jnp.split(probs_XNbKb.astype(v_BSNH.dtype), width, axis=-1)
    out_XbNH = sum(jnp.einsum('xnts,xsnh->xtnh', probs_XNbb, v_XbNH,
                              preferred_element_type=jnp.float32)
                   for probs_XNbb, v_XbNH in zip(probs_K_XNbb, columns(v_BSNH)))
    out_XbNH = out_XbNH.astype(v_BSNH.dtype)
    outs_BXbNH.append(out_XbNH.reshape(batch, rows, b, num_heads, head_dim))

  out_BRbNH = jnp.concatenate(outs_BXbNH, axis=1)
  order_R = np.concatenate([dense_rows, sparse_rows])
  if (order_R != np.arange(num_q_blocks)).any():
    out_BRbNH = _take(out_BRbNH, np.argsort(order_R), 1)
  return out_BRbNH.reshape(batch, t_pad, num_heads, head_dim)[:, :q_len]


attention.register_kernel('block_sparse', block_sparse_kernel)
