"""Autoregressive generation with the KV cache, and the samplers it draws tokens with.

    tokens = generate(model, params, [[5, 7, 9], [3]], rng, max_new_tokens=20,
                      sampler=make_sampler('top_p', p=0.9), eos_id=2, pad_id=0)

Batched prompts of different lengths are LEFT-padded inside `generate`, so every row's
last prompt token sits in the same cache slot and all rows step together through one
shared `cache_index`. The padding gets segment id 0, which the attention layers cache and
mask out, and positions count from each row's first real token, so a row's tokens are the
same as when its prompt is decoded alone. Models must take GPT's decode interface:
`model.apply(vars, tokens_BT, segment_ids_BT=, positions_BT=, decode=True,
mutable=['cache'])` and have `config.max_len`.

A prefix LM (`config.mask == 'prefix_lm'`, T5's decoder-only prefix LM) reads its prompt
as the prefix: each prompt token sees the row's whole prompt, the new tokens are causal.
The prefix length of a row is its prompt's length; in the left-aligned cache every
prompt ends at slot P, so `generate` passes `prefix_lengths_B` = P (cache slots) on every
call, and the prompt is written in one call. Other masks decode as before.

Dims as in attention.py, plus P (prompt width), V (vocabulary), L (new tokens).
"""

import dataclasses
import functools
from typing import Any, Protocol, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# -------------------------------------------------------------------------- samplers


class Sampler(Protocol):
  """Picks the next token `[B]` (int32) from float32 logits `[B, V]`."""

  def __call__(self, rng: Array, logits_BV: Array) -> Array:
    ...


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f'temperature must be positive, got {temperature!r}')


@dataclasses.dataclass(frozen=True)
class Greedy:
  """The most likely token."""

  def __call__(self, rng: Array, logits_BV: Array) -> Array:
    del rng  # Deterministic.
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
  """A draw from softmax(logits / temperature)."""
  temperature: float = 1.0

  def __post_init__(self):
    _check_temperature(self.temperature)

  def __call__(self, rng: Array, logits_BV: Array) -> Array:
    return jax.random.categorical(rng, logits_BV / self.temperature).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
  """A draw among the k most likely tokens (Fan et al. 2018)."""
  k: int = 40
  temperature: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.k, int) and self.k >= 1):
      raise ValueError(f'top_k needs k >= 1, got {self.k!r}')
    _check_temperature(self.temperature)

  def __call__(self, rng: Array, logits_BV: Array) -> Array:
    top_BK, index_BK = lax.top_k(logits_BV, min(self.k, logits_BV.shape[-1]))
    choice_B = jax.random.categorical(rng, top_BK / self.temperature)
    return jnp.take_along_axis(index_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
  """A draw from the nucleus: the fewest most likely tokens whose mass reaches p.

  Holtzman et al. 2020; the temperature is applied before the nucleus is chosen.
  """
  p: float = 0.9
  temperature: float = 1.0

  def __post_init__(self):
    if not 0.0 < self.p <= 1.0:
      raise ValueError(f'top_p needs 0 < p <= 1, got {self.p!r}')
    _check_temperature(self.temperature)

  def __call__(self, rng: Array, logits_BV: Array) -> Array:
    sorted_BV, index_BV = lax.top_k(logits_BV / self.temperature, logits_BV.shape[-1])
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token is in the nucleus if the mass strictly before it is still short of p; so
    # the most likely token always is.
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    nucleus_BV = mass_before_BV < self.p
    choice_B = jax.random.categorical(rng, jnp.where(nucleus_BV, sorted_BV, -jnp.inf))
    return jnp.take_along_axis(index_BV, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


SAMPLERS: dict[str, type] = {
    'greedy': Greedy,
    'temperature': Temperature,
    'top_k': TopK,
    'top_p': TopP,
}


def make_sampler(name: str, **settings: Any) -> Sampler:
  """The sampler registered as `name`, e.g. `make_sampler('top_k', k=5)`."""
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampler {name!r} (known: {", ".join(sorted(SAMPLERS))})')
  return SAMPLERS[name](**settings)


# ------------------------------------------------------------------------ generation


def init_cache(model: nn.Module, batch_size: int, cache_len: int) -> Any:
  """An empty (all-zero) KV cache for `batch_size` rows of `cache_len` slots."""
  dummy_BS = jnp.zeros((batch_size, cache_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_BS, decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def left_align(tokens_BP: Array, lengths_B: Array, pad_id: int) -> tuple[Array, Array, Array]:
  """Moves right-padded prompts to the right edge: (tokens, segment ids, positions)."""
  width = tokens_BP.shape[1]
  # Slot j of a left-aligned row holds token j - (P - length) of the right-padded row.
  source_BP = jnp.arange(width)[None, :] - (width - lengths_B)[:, None]
  real_BP = source_BP >= 0
  tokens_BP = jnp.take_along_axis(tokens_BP, jnp.maximum(source_BP, 0), axis=1)
  tokens_BP = jnp.where(real_BP, tokens_BP, pad_id)
  return tokens_BP, real_BP.astype(jnp.int32), jnp.where(real_BP, source_BP, 0)


def _prompt_prefix_lengths(model: nn.Module, batch_size: int, width: int) -> Array | None:
  """A prefix LM's prefix in the cache: each row's left-aligned prompt, so slots < P.

  The padding before a shorter prompt lies inside, masked by its segment id 0. None when
  the model's mask is not 'prefix_lm' (its decode calls take no prefix lengths).
  """
  if getattr(model.config, 'mask', None) != 'prefix_lm':
    return None
  return jnp.full((batch_size,), width, jnp.int32)


def _apply_decode(model, params, cache, tokens_BT, segment_ids_BT, positions_BT,
                  prefix_lengths_B=None):
  """One decode call: logits of the chunk `[B, T, V]` and the updated cache."""
  # Only a prefix LM gets prefix lengths: other models need not take the argument.
  prefix = {} if prefix_lengths_B is None else {'prefix_lengths_B': prefix_lengths_B}
  logits_BTV, variables = model.apply(
      {'params': params, 'cache': cache}, tokens_BT, segment_ids_BT=segment_ids_BT,
      positions_BT=positions_BT, decode=True, mutable=['cache'], **prefix)
  return logits_BTV, variables['cache']


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'sampler'))
def _generate(model, params, tokens_BP, lengths_B, rng, eos_id, pad_id, *, max_new_tokens,
              sampler):
  """Prefills the prompts in one call, then decodes one token per loop step.

  `eos_id` (-1 for none) and `pad_id` are traced, so changing them does not recompile.
  """
  batch_size, width = tokens_BP.shape
  tokens_BP, segment_ids_BP, positions_BP = left_align(tokens_BP, lengths_B, pad_id)
  prefix_lengths_B = _prompt_prefix_lengths(model, batch_size, width)
  cache = init_cache(model, batch_size, width + max_new_tokens)
  logits_BPV, cache = _apply_decode(model, params, cache, tokens_BP, segment_ids_BP,
                                    positions_BP, prefix_lengths_B)
  # Left alignment puts every row's last prompt token in the last slot.
  next_B = sampler(jax.random.fold_in(rng, 0), logits_BPV[:, -1])

  out_BL = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(next_B)

  def keep_going(state):
    step, _, _, _, done_B = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def decode_one(state):
    # Feeds the token generated at step-1, which sits at position length + step - 1.
    step, cache, out_BL, last_B, done_B = state
    positions_B1 = (lengths_B + step - 1)[:, None]
    # A prefix LM's new tokens lie past the prefix, so its mask is causal for them.
    logits_B1V, cache = _apply_decode(model, params, cache, last_B[:, None],
                                      jnp.ones_like(positions_B1), positions_B1,
                                      prefix_lengths_B)
    next_B = sampler(jax.random.fold_in(rng, step), logits_B1V[:, 0])
    next_B = jnp.where(done_B, pad_id, next_B)
    out_BL = out_BL.at[:, step].set(next_B)
    return step + 1, cache, out_BL, next_B, done_B | (next_B == eos_id)

  state = (jnp.array(1, jnp.int32), cache, out_BL, next_B, next_B == eos_id)
  _, _, out_BL, _, _ = lax.while_loop(keep_going, decode_one, state)
  return out_BL


def _pad_prompts(prompts, prompt_lengths, pad_id) -> tuple[Array, Array]:
  """Right-padded `[B, P]` prompts and their lengths `[B]`."""
  if prompt_lengths is not None:
    return jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32)
  if isinstance(prompts, (np.ndarray, jax.Array)):
    tokens_BP = jnp.asarray(prompts, jnp.int32)
    return tokens_BP, jnp.full(tokens_BP.shape[:1], tokens_BP.shape[1], jnp.int32)
  lengths = [len(p) for p in prompts]
  if not lengths or min(lengths) < 1:
    raise ValueError(f'every prompt needs at least one token, got lengths {lengths}')
  tokens_BP = np.full((len(prompts), max(lengths)), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BP[row, :len(prompt)] = prompt
  return jnp.asarray(tokens_BP), jnp.asarray(lengths, jnp.int32)


def generate(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]] | Array,
             rng: Array, *, max_new_tokens: int, sampler: Sampler | str = 'greedy',
             eos_id: int | None = None, pad_id: int = 0,
             prompt_lengths: Array | None = None) -> Array:
  """Continues each prompt by up to `max_new_tokens` tokens.

  A prefix LM (`model.config.mask == 'prefix_lm'`) reads each prompt as its prefix,
  bidirectionally, as a full forward pass with `prefix_lengths_B` = the prompt lengths
  does; the caller passes nothing extra.

  Args:
    model: a GPT-like module (see the module docstring).
    params: its 'params' collection.
    prompts: a list of token lists, or a right-padded `[B, P]` int array (with
      `prompt_lengths`, else every row is P long). Every prompt needs a token.
    rng: key for the sampler; step i draws with `fold_in(rng, i)`.
    max_new_tokens: L; P + L must not exceed `model.config.max_len`.
    sampler: a Sampler, or the name of one with its default settings.
    eos_id: a row stops after emitting it (it is kept); None never stops early.
    pad_id: fills a row after its eos, and the prompts' padding.
    prompt_lengths: `[B]` lengths of array prompts.

  Returns:
    `[B, L]` int32 new tokens; after a row's eos, `pad_id`.
  """
  if isinstance(sampler, str):
    sampler = make_sampler(sampler)
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  tokens_BP, lengths_B = _pad_prompts(prompts, prompt_lengths, pad_id)
  max_len = model.config.max_len
  if tokens_BP.shape[1] + max_new_tokens > max_len:
    raise ValueError(f'prompt width {tokens_BP.shape[1]} + max_new_tokens={max_new_tokens} '
                     f'exceeds the model max_len={max_len}')
  eos_id = -1 if eos_id is None else eos_id  # Token ids are >= 0, so -1 never matches.
  return _generate(model, nn.unbox(params), tokens_BP, lengths_B, rng,
                   jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32),
                   max_new_tokens=max_new_tokens, sampler=sampler)
