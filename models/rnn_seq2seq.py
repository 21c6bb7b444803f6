"""RNN sequence-to-sequence models, the encoder-decoders the Transformer replaced.

An encoder of stacked (bi)RNNs (flax's LSTM/GRU cells) reads the source; a decoder of
stacked RNNs writes the target, in one of three eras picked by `attention`:

  'none'      Sutskever et al. 2014. The encoder's final state is the decoder's initial
              state, the only bridge:  s_t = RNN(s_{t-1}, E y_{t-1});  logits = W_s s_t.
              (Their reversed source is a data-side choice, not made here.)
  'bahdanau'  Bahdanau et al. 2015. The PREVIOUS state queries the annotations h_j:
                e_tj = vᵀ tanh(W s_{t-1} + U h_j),  a_t = softmax(e_t),  c_t = Σ_j a_tj h_j
                s_t = RNN(s_{t-1}, [E y_{t-1}; c_t])
                logits = W_o tanh(D [s_t; c_t; E y_{t-1}] + d)
              A tanh deep output of width E stands in for the paper's maxout; W_o is the
              embedding when shared. s_0 = tanh(W_s h←_1 + b): the backward state at the
              segment's first token (a unidirectional encoder: the forward final state);
              an LSTM's memory c_0 = 0. Stacked: s_{t-1} is the top layer's, c_t enters
              the first layer.
  'luong'     Luong et al. 2015. The CURRENT state queries:
                h_t = RNN(h_{t-1}, [E y_{t-1}; h̃_{t-1}])   (h̃_{t-1} with `input_feeding`,
                                                           h̃_0 = 0, into the first layer)
                score(h_t, h̄_s) = h_tᵀ h̄_s (dot) | h_tᵀ W_a h̄_s (general)
                                | vᵀ tanh(W_a [h_t; h̄_s]) (concat)
                c_t = Σ_s a_ts h̄_s,  h̃_t = tanh(W_c [c_t; h_t]),  logits = W_s h̃_t.

Scores are those of attention.py with one head (N = 1, H = the width): Bahdanau's score
and Luong's concat are 'additive' (W_a [h; h̄] splits into W h + U h̄), Luong's dot is
'dot' (unscaled, as in the paper) and general is 'general' (BilinearScore, which starts at
W_a = I/sqrt(H), the scaled dot, not at U(-r, r)); the additive score's W and v keep their
own (lecun-normal) init, its U is the key projection below. Masked logits and the softmax
are float32; a query of padding sees no key and gets zero weights (never NaN).

Keys: a bidirectional encoder's annotations are [h→; h←] (2H wide); the scores read them
through a learned key projection P (2H -> H, no bias), k_s = P h̄_s, while the context sums
the annotations themselves, so 'dot' over a bidirectional encoder is in effect a
rectangular 'general' score. The additive scores' U h̄_s does not depend on the decoder
step, so U is that key projection (C -> H, for any encoder), applied once per source
outside the scan rather than at every step (Bahdanau et al., appendix A.1.2); inside, the
score adds W s to the projected keys.

Initial decoder states ('none' and 'luong'): a unidirectional encoder's final state is
copied layer by layer (Sutskever, Luong); a bidirectional one's [→; ←] goes through a
dense bridge per layer (h_0 = tanh(W [h→; h←] + b); an LSTM's c_0 = W' [c→; c←] + b').

Packed rows (segment ids 1, 2, ...; 0 = padding; positions restart at 0 per segment) are
read without unpacking: every recurrence restarts at a segment start (forward: where the
position is 0; backward: where the next token starts a segment or is padding), a padding
step leaves the state as it was, each segment's final state is picked from the scan's
states, target segment k starts from source segment k's bridge and attends only to
source segment k. Each layer and direction is one `nn.scan` over the cell with the
restart folded in (`carry = where(start, initial, carry)`). Recurrent states are kept in
float32 whatever `dtype` computes. Dropout (when not deterministic): on the embeddings,
on each encoder layer's outputs, between decoder layers and on the decoder's output
vector.

Embeddings: with `share_embeddings` one table over a joint vocabulary embeds the source
and the target and is the output projection whenever the decoder's output vector is
`embed_dim` wide (always for 'bahdanau'; for the others when hidden_dim == embed_dim);
otherwise the output projection is a dense layer. Without it, the source and the target
have tables of their own and the output is a dense layer.

Dims as in attention.py, plus E (embedding width), H (RNN width), C (an annotation's
width: 2H bidirectional, else H), X (the decoder's output vector), V (vocabulary) and K
(segment slots: S, room for one segment per source token).
"""

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models import layers

Array = jax.Array
Carry = Any  # an LSTM's (c, h) or a GRU's h, leaves [..., H]

CELLS = {'lstm': nn.OptimizedLSTMCell, 'gru': nn.GRUCell}
ATTENTIONS = ('none', 'bahdanau', 'luong')
# Luong's scores by the names of attention.SCORES.
LUONG_SCORES = {'dot': 'dot', 'general': 'general', 'concat': 'additive'}
RECURRENT_INITS = ('orthogonal', 'uniform')

# Logits of masked keys: finite, as in attention.py, so a row without keys stays NaN-free.
_MASKED = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNSeq2SeqConfig:
  """An RNN encoder-decoder's hyperparameters: `RNNSeq2SeqConfig(**config.model)`.

  Errors name the class and the field, e.g. "RNNSeq2SeqConfig.cell='foo' is not one of:
  gru, lstm".
  """
  vocab_size: int
  max_len: int  # the longest target the decoder is asked to produce (checks decode lengths)
  embed_dim: int
  hidden_dim: int
  num_layers: int = 1  # stacked RNNs, on each side
  cell: str = 'lstm'  # lstm | gru
  bidirectional: bool = False  # the encoder
  attention: str = 'luong'  # none (Sutskever) | bahdanau | luong
  luong_score: str = 'general'  # dot | general | concat
  input_feeding: bool = False  # Luong: h̃_{t-1} joins the decoder's input
  dropout_rate: float = 0.0  # on embeddings and RNN outputs
  share_embeddings: bool = False  # one joint vocabulary: source, target, output
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  init_range: float = 0.1  # every weight and embedding ~ U(-r, r) (Sutskever 0.08, Luong 0.1)
  recurrent_init: str = 'orthogonal'  # the cells' recurrent kernels: orthogonal | uniform

  def __post_init__(self):
    for name in ('vocab_size', 'max_len', 'embed_dim', 'hidden_dim', 'num_layers'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        self._fail(f'{name} must be a positive integer, got {value!r}')
    for name, choices in (('cell', CELLS), ('attention', ATTENTIONS),
                          ('luong_score', LUONG_SCORES), ('recurrent_init', RECURRENT_INITS)):
      value = getattr(self, name)
      if value not in choices:
        self._fail(f'{name}={value!r} is not one of: {", ".join(sorted(choices))}')
    for name in ('bidirectional', 'input_feeding', 'share_embeddings'):
      if not isinstance(getattr(self, name), bool):
        self._fail(f'{name} must be a bool, got {getattr(self, name)!r}')
    if self.input_feeding and self.attention != 'luong':
      self._fail(f"input_feeding=True feeds Luong's attentional vector back, so it needs "
                 f"attention='luong', got attention={self.attention!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      self._fail(f'dropout_rate must lie in [0, 1), got {self.dropout_rate!r}')
    if not (isinstance(self.init_range, (int, float)) and self.init_range > 0):
      self._fail(f'init_range must be positive, got {self.init_range!r}')
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      try:
        floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        floating = False
      if not floating:
        self._fail(f"{name} must name a floating dtype such as 'float32' or 'bfloat16', "
                   f'got {value!r}')

  def _fail(self, message: str):
    raise ValueError(f'{type(self).__name__}.{message}')

  @property
  def annotation_dim(self) -> int:
    """C: the width of an encoder annotation, [h→; h←] when bidirectional."""
    return 2 * self.hidden_dim if self.bidirectional else self.hidden_dim

  @property
  def output_dim(self) -> int:
    """X: the width of the vector the output projection reads."""
    return self.embed_dim if self.attention == 'bahdanau' else self.hidden_dim

  @property
  def tied_output(self) -> bool:
    """Whether the output projection is the (shared) embedding table."""
    return self.share_embeddings and self.output_dim == self.embed_dim

  @property
  def score(self) -> str:
    """The name in attention.SCORES of the decoder's score ('' without attention)."""
    return {'none': '', 'bahdanau': 'additive',
            'luong': LUONG_SCORES[self.luong_score]}[self.attention]

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def uniform_init(self) -> layers.Initializer:
    return _uniform(self.init_range)


def _uniform(limit: float) -> layers.Initializer:
  """U(-limit, limit)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


# ---------------------------------------------------------------------- small helpers


def carry_hidden(cfg: RNNSeq2SeqConfig, carry: Carry) -> Array:
  """The output part h of a carry (an LSTM's carry is (c, h))."""
  return carry[1] if cfg.cell == 'lstm' else carry


def _zero_carry(cfg: RNNSeq2SeqConfig, batch_shape: tuple[int, ...], width: int) -> Carry:
  zeros = jnp.zeros((*batch_shape, width), jnp.float32)
  return (zeros, zeros) if cfg.cell == 'lstm' else zeros


def _where(condition_B: Array, new: Any, old: Any) -> Any:
  """`new` in the rows where `condition_B` holds, else `old`, leaf by leaf."""
  return jax.tree.map(
      lambda a, b: jnp.where(condition_B.reshape(condition_B.shape + (1,) * (a.ndim - 1)), a, b),
      new, old)


def _as_float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _dense(cfg: RNNSeq2SeqConfig, features: int, name: str, *, use_bias: bool = True,
           out_axis: str = 'mlp', dtype: Any = None) -> nn.Dense:
  """A dense layer with the config's init; its input axis is left unsharded."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=cfg.compute_dtype if dtype is None else dtype,
      param_dtype=cfg.storage_dtype,
      kernel_init=nn.with_logical_partitioning(cfg.uniform_init, (None, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)), name=name)


def _cell(cfg: RNNSeq2SeqConfig, name: str) -> nn.Module:
  recurrent_init = (nn.initializers.orthogonal() if cfg.recurrent_init == 'orthogonal'
                    else cfg.uniform_init)
  return CELLS[cfg.cell](
      features=cfg.hidden_dim, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
      kernel_init=nn.with_logical_partitioning(cfg.uniform_init, (None, 'mlp')),
      recurrent_kernel_init=nn.with_logical_partitioning(recurrent_init, (None, 'mlp')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)), name=name)


def segment_boundaries(segment_ids_BT: Array,
                       positions_BT: Array | None) -> tuple[Array, Array]:
  """(starts, ends) `[B, T]` bool: where a forward / a backward recurrence restarts.

  A forward RNN restarts where the position is 0 (or, without positions, where the
  segment id changes); a backward one (scanning right to left) where the NEXT token
  starts a segment, is padding, or does not exist.
  """
  if positions_BT is not None:
    starts_BT = positions_BT == 0
  else:
    previous_BT = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts_BT = segment_ids_BT != previous_BT
  next_starts_BT = jnp.pad(starts_BT[:, 1:], ((0, 0), (0, 1)), constant_values=True)
  next_padding_BT = jnp.pad(segment_ids_BT[:, 1:] == 0, ((0, 0), (0, 1)),
                            constant_values=True)
  return starts_BT, next_starts_BT | next_padding_BT


def segment_extents(segment_ids_BS: Array) -> tuple[Array, Array]:
  """(first, last) `[B, K]`: the slots of segment k+1's first and last tokens (K = S).

  Absent segments give slots that are never read (S - 1 and 0).
  """
  batch_size, length = segment_ids_BS.shape
  slots_BS = attention.sequence_index(batch_size, length)
  rows_B1 = jnp.arange(batch_size)[:, None]
  # Padding (segment 0) goes to slot K, out of range, and is dropped.
  index_BS = jnp.where(segment_ids_BS > 0, segment_ids_BS - 1, length)
  first_BK = jnp.full((batch_size, length), length - 1, jnp.int32).at[rows_B1, index_BS].min(
      slots_BS, mode='drop')
  last_BK = jnp.zeros((batch_size, length), jnp.int32).at[rows_B1, index_BS].max(
      slots_BS, mode='drop')
  return first_BK, last_BK


def _take_slots(tree: Any, index_BT: Array) -> Any:
  """Each leaf `[B, K, ...]` read at `index_BT`: `[B, T, ...]`."""
  return jax.tree.map(
      lambda x: jnp.take_along_axis(
          x, index_BT.reshape(index_BT.shape + (1,) * (x.ndim - 2)), axis=1), tree)


def segment_finals(final: Any, segment_ids_BT: Array) -> Any:
  """Each target position's own source segment's final encoder state, from `encoded['final']`.

  Target segment k reads slot k - 1; padding (0) reads slot 0, a state it never uses.
  """
  num_slots = jax.tree.leaves(final)[0].shape[1]
  return _take_slots(final, jnp.clip(segment_ids_BT - 1, 0, num_slots - 1))


def _projected_keys(cfg: RNNSeq2SeqConfig) -> bool:
  """Whether the score takes keys the decoder projected once per source (the additive)."""
  return cfg.score == 'additive'


def _score_settings(cfg: RNNSeq2SeqConfig) -> dict[str, Any]:
  return {'project_keys': False} if _projected_keys(cfg) else {}


def _attend(score: nn.Module, query_BH: Array, memory: dict[str, Array],
            segment_ids_B: Array) -> tuple[Array, Array]:
  """One query per row over the annotations of its own segment: (context `[B, C]`,
  weights `[B, S]` float32). A query of segment 0 (padding) sees nothing: zeros."""
  logits_BNTS = score(query_BH[:, None, None, :], memory['keys_BSH'][:, :, None, :])
  mask_B1TS = attention.segment_mask(segment_ids_B[:, None], memory['segment_ids_BS'])
  logits_BS = jnp.where(mask_B1TS, logits_BNTS, _MASKED)[:, 0, 0]
  weights_BS = jax.nn.softmax(logits_BS, axis=-1)
  weights_BS = jnp.where(mask_B1TS[:, 0, 0].any(axis=-1, keepdims=True), weights_BS, 0.0)
  values_BSC = memory['values_BSC']
  context_BC = jnp.einsum('bs,bsc->bc', weights_BS.astype(values_BSC.dtype), values_BSC)
  return context_BC, weights_BS


# -------------------------------------------------------------------------- encoder


class _ResetCell(nn.Module):
  """One RNN cell, scanned over time, that restarts from zeros where `starts` holds and
  keeps its state over padding. Returns the state after each step as the scan's output."""
  config: RNNSeq2SeqConfig

  @nn.compact
  def __call__(self, carry: Carry, xs: tuple[Array, Array, Array]) -> tuple[Carry, Carry]:
    x_BX, start_B, valid_B = xs
    fresh = _where(start_B, _zero_carry(self.config, start_B.shape, self.config.hidden_dim),
                   carry)
    new, _ = _cell(self.config, 'cell')(fresh, x_BX)
    # Padding keeps the state. (With restarts at every segment start a padding step is
    # never read anyway; in decode mode a step of segment 0 relies on this.)
    new = _where(valid_B, _as_float32(new), carry)
    return new, new


class RNNEncoder(nn.Module):
  """Stacked (bi)RNNs over packed rows: annotations `[B, S, C]` (zeros at padding) and
  per layer each segment's final state, leaves `[B, K, C]` ([→ at its last token;
  ← at its first] when bidirectional)."""
  config: RNNSeq2SeqConfig

  @nn.compact
  def __call__(self, x_BSE: Array, *, segment_ids_BS: Array, positions_BS: Array | None,
               deterministic: bool) -> tuple[Array, tuple[Carry, ...]]:
    cfg = self.config
    batch_size = x_BSE.shape[0]
    starts_BS, ends_BS = segment_boundaries(segment_ids_BS, positions_BS)
    valid_BS = segment_ids_BS > 0
    first_BK, last_BK = segment_extents(segment_ids_BS)
    directions = [('forward', starts_BS, last_BK, False)]
    if cfg.bidirectional:
      directions.append(('backward', ends_BS, first_BK, True))
    x_BSX, finals = x_BSE, []
    for layer in range(cfg.num_layers):
      outputs, layer_finals = [], []
      for name, resets_BS, final_slots_BK, reverse in directions:
        scan = nn.scan(_ResetCell, variable_broadcast='params',
                       split_rngs={'params': False}, in_axes=1, out_axes=1, reverse=reverse)
        _, states = scan(cfg, name=f'layer_{layer}_{name}')(
            _zero_carry(cfg, (batch_size,), cfg.hidden_dim), (x_BSX, resets_BS, valid_BS))
        outputs.append(carry_hidden(cfg, states))
        # A forward state is final at the segment's last token; a backward one at its first.
        layer_finals.append(_take_slots(states, final_slots_BK))
      finals.append(jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=-1),
                                 *layer_finals))
      x_BSX = jnp.concatenate(outputs, axis=-1).astype(cfg.compute_dtype)
      x_BSX = jnp.where(valid_BS[..., None], x_BSX, 0)
      x_BSX = nn.Dropout(cfg.dropout_rate)(x_BSX, deterministic=deterministic)
    return nn.with_logical_constraint(x_BSX, ('batch', 'length', 'mlp')), tuple(finals)


# -------------------------------------------------------------------------- decoder


class DecoderStep(nn.Module):
  """One time step of the decoder over all its layers, scanned over the target.

  carry: (per-layer states, h̃_{t-1} or None); xs: the step's embedded input, whether it
  starts a segment (then the states restart from `init`, h̃ from zeros), whether it is
  real (padding keeps the carry), its segment id (attention stays in that segment).
  Returns the output vector `[B, X]` and the attention weights `[B, S]` (or None).
  """
  config: RNNSeq2SeqConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry, xs: dict[str, Any], memory: dict[str, Array]):
    cfg = self.config
    states, feed_BH = carry
    start_B, valid_B = xs['start'], xs['valid']
    fresh = _where(start_B, xs['init'], states)
    if feed_BH is not None:
      feed_BH = jnp.where(start_B[:, None], 0.0, feed_BH)
    y_BE = xs['embedded']
    score = None
    if cfg.attention != 'none':
      score = attention.build_score(cfg.score, dtype=cfg.compute_dtype,
                                    param_dtype=cfg.storage_dtype, name='score',
                                    **_score_settings(cfg))

    weights_BS = None
    x_BX = y_BE
    if cfg.attention == 'bahdanau':
      # The query is s_{t-1}: the top layer's state before this step.
      query_BH = carry_hidden(cfg, fresh[-1]).astype(cfg.compute_dtype)
      context_BC, weights_BS = _attend(score, query_BH, memory, xs['segment'])
      x_BX = jnp.concatenate([y_BE, context_BC], axis=-1)
    elif cfg.input_feeding:
      x_BX = jnp.concatenate([y_BE, feed_BH.astype(cfg.compute_dtype)], axis=-1)

    new_states = []
    for layer in range(cfg.num_layers):
      state, x_BX = _cell(cfg, f'cell_{layer}')(fresh[layer], x_BX)
      new_states.append(_as_float32(state))
      x_BX = x_BX.astype(cfg.compute_dtype)
      if layer < cfg.num_layers - 1:
        x_BX = nn.Dropout(cfg.dropout_rate)(x_BX, deterministic=self.deterministic)
    top_BH = x_BX

    if cfg.attention == 'luong':
      context_BC, weights_BS = _attend(score, top_BH, memory, xs['segment'])
      # h̃_t = tanh(W_c [c_t; h_t]); Luong's W_c has no bias.
      out_BX = jnp.tanh(_dense(cfg, cfg.hidden_dim, 'attentional', use_bias=False)(
          jnp.concatenate([context_BC, top_BH], axis=-1)))
      if feed_BH is not None:
        feed_BH = jnp.where(valid_B[:, None], out_BX.astype(jnp.float32), feed_BH)
    elif cfg.attention == 'bahdanau':
      out_BX = jnp.tanh(_dense(cfg, cfg.embed_dim, 'deep_output')(
          jnp.concatenate([top_BH, context_BC, y_BE], axis=-1)))
    else:
      out_BX = top_BH
    new_states = _where(valid_B, tuple(new_states), states)
    return (new_states, feed_BH), (out_BX, weights_BS)


class RNNDecoder(nn.Module):
  """The decoder: the bridge from the encoder's final states, then the scanned steps.

  Teacher forcing scans the whole target; decode mode scans the new tokens from the
  carry in the 'cache' collection (see `RNNSeq2Seq.decode`).
  """
  config: RNNSeq2SeqConfig

  @nn.compact
  def __call__(self, y_BTE: Array, encoded: dict[str, Any] | None, *,
               segment_ids_BT: Array | None, positions_BT: Array | None,
               deterministic: bool, decode: bool) -> tuple[Array, Array | None]:
    cfg = self.config
    batch_size, length = y_BTE.shape[:2]
    if decode and length > cfg.max_len:
      raise ValueError(f'decoding {length} target tokens, more than '
                       f'RNNSeq2SeqConfig.max_len={cfg.max_len}')
    explicit_segments = segment_ids_BT is not None
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((batch_size, length), jnp.int32)
    zero_states = tuple(_zero_carry(cfg, (batch_size,), cfg.hidden_dim)
                        for _ in range(cfg.num_layers))
    zero_feed = (jnp.zeros((batch_size, cfg.hidden_dim), jnp.float32)
                 if cfg.input_feeding else None)

    shaping_cache = decode and not self.has_variable('cache', 'index')
    if not decode or shaping_cache:
      # Teacher forcing; also `init` in decode mode, which then shapes the cache.
      if encoded is None:
        raise ValueError('teacher forcing (and the cache\'s init) needs `encoded`')
      memory = self._memory(encoded)
      init = self._bridge(segment_finals(encoded['final'], segment_ids_BT))
      starts_BT, _ = segment_boundaries(segment_ids_BT, positions_BT)
      carry = (zero_states, zero_feed)
      if decode:
        self._cache(batch_size, encoded, zero_states, zero_feed)
    else:
      cache = self._cache(batch_size, encoded, zero_states, zero_feed)
      if encoded is not None:
        # The prime: store what the steps need from the source, and the bridged state.
        memory = self._memory(encoded)
        for name, value in memory.items():
          cache[name].value = value
        primed_B = segment_ids_BT[:, 0]
        cache['segment_ids_B'].value = primed_B
        init = self._bridge(segment_finals(encoded['final'], primed_B[:, None]))
        cache['carry'].value = jax.tree.map(lambda x: x[:, 0], init)
        if zero_feed is not None:
          cache['feed'].value = zero_feed
        cache['index'].value = jnp.array(0, jnp.int32)
      memory = {name: cache[name].value for name in self._memory_names()}
      if not explicit_segments:
        segment_ids_BT = jnp.broadcast_to(cache['segment_ids_B'].value[:, None],
                                          (batch_size, length))
      # The carry continues from the cache: no restarts within a decoded target.
      starts_BT = jnp.zeros((batch_size, length), jnp.bool_)
      states = cache['carry'].value
      init = jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (batch_size, length)
                                                     + x.shape[1:]), states)
      carry = (states, cache['feed'].value if zero_feed is not None else None)

    xs = dict(embedded=y_BTE, start=starts_BT, valid=segment_ids_BT > 0, init=init,
              segment=segment_ids_BT)
    scan = nn.scan(DecoderStep, variable_broadcast='params',
                   split_rngs={'params': False, 'dropout': True},
                   in_axes=(1, nn.broadcast), out_axes=1)
    carry, (out_BTX, weights_BTS) = scan(cfg, deterministic=deterministic, name='step')(
        carry, xs, memory)
    if decode and not shaping_cache:
      cache['carry'].value = carry[0]
      if zero_feed is not None:
        cache['feed'].value = carry[1]
      cache['index'].value = cache['index'].value + length
    return out_BTX, weights_BTS

  def _memory_names(self) -> tuple[str, ...]:
    return () if self.config.attention == 'none' else ('keys_BSH', 'values_BSC',
                                                       'segment_ids_BS')

  def _memory(self, encoded: dict[str, Any]) -> dict[str, Array]:
    """What attention reads: the annotations, their keys and their segment ids."""
    cfg = self.config
    if cfg.attention == 'none':
      return {}
    values_BSC = encoded['hidden'].astype(cfg.compute_dtype)
    keys_BSH = values_BSC
    if cfg.annotation_dim != cfg.hidden_dim or _projected_keys(cfg):
      # Scores compare H-wide queries and keys: bidirectional annotations are projected;
      # an additive score's U is this projection, once per source.
      keys_BSH = _dense(cfg, cfg.hidden_dim, 'key_projection', use_bias=False)(values_BSC)
    return dict(keys_BSH=keys_BSH, values_BSC=values_BSC,
                segment_ids_BS=encoded['segment_ids'].astype(jnp.int32))

  def _bridge(self, finals: tuple[Carry, ...]) -> tuple[Carry, ...]:
    """The decoder's initial state per layer from the encoder's final ones (leaves [B, T, C])."""
    cfg = self.config
    hidden_dim = cfg.hidden_dim
    states = []
    for layer, final in enumerate(finals):
      h_BTC = carry_hidden(cfg, final)
      if cfg.attention == 'bahdanau':
        # s_0 = tanh(W_s h←_1): the backward half (a unidirectional encoder: forward final).
        backward_BTH = h_BTC[..., hidden_dim:] if cfg.bidirectional else h_BTC
        h_BTH = jnp.tanh(_dense(cfg, hidden_dim, f'bridge_{layer}')(backward_BTH))
        state = (jnp.zeros_like(h_BTH), h_BTH) if cfg.cell == 'lstm' else h_BTH
      elif cfg.bidirectional:
        h_BTH = jnp.tanh(_dense(cfg, hidden_dim, f'bridge_{layer}_h')(h_BTC))
        state = h_BTH
        if cfg.cell == 'lstm':
          state = (_dense(cfg, hidden_dim, f'bridge_{layer}_c')(final[0]), h_BTH)
      else:
        state = final  # Sutskever, Luong: the encoder's final state as it is.
      states.append(_as_float32(state))
    return tuple(states)

  def _cache(self, batch_size: int, encoded: dict[str, Any] | None, zero_states,
             zero_feed) -> dict[str, Any]:
    """The 'cache' variables, batch at axis 0 (the step counter is a scalar); `init`
    shapes them from `encoded`, later calls only read and write them."""
    cfg = self.config
    source_length = lambda: encoded['hidden'].shape[1]
    shapes = {}
    if cfg.attention != 'none':
      shapes = dict(
          keys_BSH=(lambda: (batch_size, source_length(), cfg.hidden_dim), cfg.compute_dtype),
          values_BSC=(lambda: (batch_size, source_length(), cfg.annotation_dim),
                      cfg.compute_dtype),
          segment_ids_BS=(lambda: (batch_size, source_length()), jnp.int32))
    shapes['segment_ids_B'] = (lambda: (batch_size,), jnp.int32)
    cache = {name: self.variable('cache', name, lambda s=shape, d=dtype: jnp.zeros(s(), d))
             for name, (shape, dtype) in shapes.items()}
    cache['carry'] = self.variable('cache', 'carry', lambda: zero_states)
    if zero_feed is not None:
      cache['feed'] = self.variable('cache', 'feed', lambda: zero_feed)
    cache['index'] = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
    return cache


# ---------------------------------------------------------------------------- model


class RNNSeq2Seq(nn.Module):
  """An RNN encoder-decoder with the seq2seq protocol of the Transformer's (encode,
  decode, teacher-forced __call__); returns float32 logits."""
  config: RNNSeq2SeqConfig
  # The decode cache's leaves that depend on the source only (beam search never
  # reorders them): the attention memory and the source's segment ids.
  source_cache: ClassVar[frozenset[str]] = frozenset(
      {'keys_BSH', 'values_BSC', 'segment_ids_BS', 'segment_ids_B'})

  def setup(self):
    cfg = self.config
    embed = functools.partial(layers.Embed, cfg.vocab_size, cfg.embed_dim,
                              dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                              embedding_init=cfg.uniform_init)
    if cfg.share_embeddings:
      self.embed = embed(name='embed')
    else:
      self.source_embed = embed(name='source_embed')
      self.target_embed = embed(name='target_embed')
    if not cfg.tied_output:
      # Float32 compute: logits in float32 whatever `dtype` is.
      self.output_projection = _dense(cfg, cfg.vocab_size, 'output_projection',
                                      out_axis='vocab', dtype=jnp.float32)
    self.encoder = RNNEncoder(cfg)
    self.decoder = RNNDecoder(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, inputs_BS: Array, decoder_inputs_BT: Array | None = None, *,
               inputs_segment_ids_BS: Array | None = None,
               inputs_positions_BS: Array | None = None,
               targets_segment_ids_BT: Array | None = None,
               targets_positions_BT: Array | None = None,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits `[B, T, V]` float32; `decoder_inputs_BT` are the targets
    shifted right with BOS at each segment start (the caller builds them). None decodes
    the inputs themselves (so `init(rng, inputs)` works as for any family)."""
    if decoder_inputs_BT is None:
      decoder_inputs_BT = inputs_BS
    encoded = self.encode(inputs_BS, segment_ids_BS=inputs_segment_ids_BS,
                          positions_BS=inputs_positions_BS, deterministic=deterministic)
    return self.decode(decoder_inputs_BT, encoded, segment_ids_BT=targets_segment_ids_BT,
                       positions_BT=targets_positions_BT, deterministic=deterministic)

  def encode(self, inputs_BS: Array, *, segment_ids_BS: Array | None = None,
             positions_BS: Array | None = None, deterministic: bool = True) -> dict[str, Any]:
    """{'hidden': annotations `[B, S, C]`, 'segment_ids': `[B, S]` int32, 'final': per
    layer the final encoder state (carry) of each source segment, leaves `[B, K, C]`,
    segment k at slot k - 1}."""
    if segment_ids_BS is None:
      segment_ids_BS = jnp.ones(inputs_BS.shape, jnp.int32)
    embed = self.embed if self.config.share_embeddings else self.source_embed
    x_BSE = self.dropout(embed(inputs_BS), deterministic=deterministic)
    hidden_BSC, final = self.encoder(x_BSE, segment_ids_BS=segment_ids_BS,
                                     positions_BS=positions_BS, deterministic=deterministic)
    return {'hidden': hidden_BSC, 'segment_ids': segment_ids_BS.astype(jnp.int32),
            'final': final}

  def decode(self, decoder_inputs_BT: Array, encoded: dict[str, Any] | None, *,
             segment_ids_BT: Array | None = None, positions_BT: Array | None = None,
             deterministic: bool = True, decode: bool = False) -> Array:
    """Logits `[B, T, V]` float32 of the tokens after `decoder_inputs_BT`.

    decode=False: teacher forcing over the whole target; target segment k starts from
    source segment k's bridged final state and attends to source segment k.
    decode=True: over the 'cache' collection. `init(..., method='decode', decode=True)`
    with a dummy `[B, max_len]` input and `encoded` shapes it; the first call after
    ("prime") passes `encoded` and the BOS tokens `[B, 1]` and caches the annotations,
    their keys and segment ids, the target's segment id and the bridged initial state;
    later calls pass `encoded=None` and `[B, 1]` tokens and continue from the cached
    state. `positions_BT` is not read in decode mode (a decoded target never restarts).
    The attention weights are sown as 'intermediates'/'attention_weights' `[B, T, S]`.
    """
    cfg = self.config
    embed = self.embed if cfg.share_embeddings else self.target_embed
    y_BTE = self.dropout(embed(decoder_inputs_BT), deterministic=deterministic)
    out_BTX, weights_BTS = self.decoder(y_BTE, encoded, segment_ids_BT=segment_ids_BT,
                                        positions_BT=positions_BT,
                                        deterministic=deterministic, decode=decode)
    if weights_BTS is not None:
      self.sow('intermediates', 'attention_weights', weights_BTS)
    out_BTX = self.dropout(out_BTX, deterministic=deterministic)
    if cfg.tied_output:
      return self.embed.attend(out_BTX)
    logits_BTV = self.output_projection(out_BTX)
    return nn.with_logical_constraint(logits_BTV.astype(jnp.float32),
                                      ('batch', 'length', 'vocab'))
