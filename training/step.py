"""The train state, its sharded initialisation, and the pure train and eval steps.

Initialisation follows the pattern that scales to pods: trace the init with `eval_shape`
(no memory), read the logical axis names of every parameter and optimizer leaf, map them to
NamedShardings, then run the jitted init with those `out_shardings` so each device creates
only its own shard.
"""

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from training import sharding as sharding_lib

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(train_state.TrainState):
  """params, opt_state, step (and the optimizer's `tx`, which is static)."""


def _prefix_lengths(model: nn.Module, sample_inputs: jax.Array) -> dict[str, jax.Array]:
  """A prefix LM's init needs prefix lengths (any: they shape no parameter); {} otherwise."""
  if getattr(getattr(model, 'config', None), 'mask', None) != 'prefix_lm':
    return {}
  return {'prefix_lengths_B': jnp.zeros(sample_inputs.shape[:1], jnp.int32)}


def _init_state(rng: jax.Array, sample_inputs: jax.Array, *, model: nn.Module,
                tx: optax.GradientTransformation) -> TrainState:
  params = model.init({'params': rng, 'dropout': rng}, sample_inputs, deterministic=True,
                      **_prefix_lengths(model, sample_inputs))['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def abstract_state(model, tx, sample_inputs, mesh, rules):
  """The state's shapes (unboxed) and its NamedShardings, with no memory allocated."""
  init = functools.partial(_init_state, model=model, tx=tx)
  boxed = jax.eval_shape(init, jax.random.key(0), sample_inputs)
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def create_state(rng, model, tx, sample_inputs, mesh, rules) -> tuple[TrainState, Any]:
  """A freshly initialised state, each leaf created directly with its sharding."""
  _, shardings = abstract_state(model, tx, sample_inputs, mesh, rules)
  init = functools.partial(_init_state, model=model, tx=tx)
  jit_init = jax.jit(lambda r, x: nn.unbox(init(r, x)), out_shardings=shardings)
  with jax.set_mesh(mesh):
    return jit_init(rng, sample_inputs), shardings


def train_step(state: TrainState, batch: dict[str, jax.Array], *, loss_fn: LossFn,
               model: nn.Module, seed: int, learning_rate_fn: Callable[[int], float],
               microbatches: int = 1):
  """One optimizer update. The dropout RNG is `fold_in(seed, step)`: reproducible on resume.

  With `microbatches` > 1 the batch's gradient is accumulated over that many slices of its
  rows, one after another, and equals the whole batch's (see `accumulated_gradients`).

  A step whose loss or gradients are not all finite leaves params and optimizer state as
  they were (the step counter still advances); `finite` in the metrics says which quantity
  failed, so the host can stop with a precise message or count the skipped step.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  loss, metrics, grads = accumulated_gradients(
      state.params, batch, rng, loss_fn=loss_fn, model=model, microbatches=microbatches)
  finite = finite_flags(loss, grads)
  ok = jnp.all(jnp.stack(list(finite.values())))
  updated = state.apply_gradients(grads=grads)
  keep = lambda new, old: jnp.where(ok, new, old)
  new_state = updated.replace(params=jax.tree.map(keep, updated.params, state.params),
                              opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state))
  return new_state, {'sums': metrics, 'loss': loss, 'grad_norm': optax.global_norm(grads),
                     'learning_rate': learning_rate_fn(state.step), 'finite': finite}


def accumulated_gradients(params, batch, rng, *, loss_fn: LossFn, model: nn.Module,
                          microbatches: int):
  """(loss, summed metrics, gradients) of the whole batch, computed over row slices.

  Objectives return the mean loss over `metrics['weight']` (e.g. scored tokens); slices
  hold different weights, so the batch's gradient is Σ_i w_i ∇loss_i / Σ_i w_i, exactly the
  gradient of the batch's mean. Memory is that of one slice; the slices run in a scan.
  """
  def grad_fn(batch_slice, slice_rng):
    def objective(p):
      return loss_fn(p, batch_slice, slice_rng, model=model, deterministic=False)
    return jax.value_and_grad(objective, has_aux=True)(params)

  if microbatches == 1:
    (loss, metrics), grads = grad_fn(batch, rng)
    return loss, metrics, grads

  rows = jax.tree.leaves(batch)[0].shape[0]
  if rows % microbatches:
    raise ValueError(f'config.train.microbatches={microbatches} does not divide the '
                     f'{rows} rows of a batch')
  # Slice i takes rows i, i+k, i+2k, ...: every device holds its share of every slice,
  # so a batch split over the data axis needs no communication to be sliced.
  slices = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(rows // microbatches, microbatches, *x.shape[1:]), 0, 1),
      batch)

  def accumulate(carry, inputs):
    index, batch_slice = inputs
    (loss, metrics), grads = grad_fn(batch_slice, jax.random.fold_in(rng, index))
    weight = metrics['weight']
    weighted = (jax.tree.map(lambda g: g * weight, grads), loss * weight, metrics)
    return jax.tree.map(jnp.add, carry, weighted), None

  first = jax.tree.map(lambda x: x[0], slices)
  shapes = jax.eval_shape(lambda: (params, *grad_fn(first, rng)[0]))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (weighted_grads, weighted_loss, metrics), _ = jax.lax.scan(
      accumulate, zeros, (jnp.arange(microbatches), slices))
  total = jnp.maximum(metrics['weight'], 1.0)
  return weighted_loss / total, metrics, jax.tree.map(lambda g: g / total, weighted_grads)


def finite_flags(loss: jax.Array, grads) -> dict[str, jax.Array]:
  """{'loss': ..., 'grad/<param path>': ...}: whether each quantity is entirely finite."""
  flags = {'loss': jnp.isfinite(loss)}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    flags['grad/' + jax.tree_util.keystr(path, simple=True, separator='/')] = (
        jnp.all(jnp.isfinite(g)))
  return flags


def eval_step(params, batch: dict[str, jax.Array], totals: dict[str, jax.Array], *,
              loss_fn: LossFn, model: nn.Module) -> dict[str, jax.Array]:
  """`totals` plus the summed metrics of one batch, deterministic (no dropout).

  Threading the running totals through the steps chains them, so they run one after another
  on the devices with no host round trip; independent steps would all be in flight at once,
  which can exhaust the CPU backend's threads in its cross-device collectives.
  """
  _, metrics = loss_fn(params, batch, jax.random.key(0), model=model, deterministic=True)
  return jax.tree.map(jnp.add, totals, metrics)


def jit_train_step(state_shardings, batch_sharding, **kwargs):
  """`train_step` compiled over the mesh, with the old state's buffers donated."""
  return jax.jit(
      functools.partial(train_step, **kwargs),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None),
      donate_argnums=(0,))


def jit_eval_step(param_shardings, batch_sharding, **kwargs):
  return jax.jit(functools.partial(eval_step, **kwargs),
                 in_shardings=(param_shardings, batch_sharding, None))


def sum_metrics(metric_list: list[dict[str, Any]]) -> dict[str, float]:
  """Adds up per-batch summed metrics on the host."""
  return {k: float(sum(float(m[k]) for m in metric_list)) for k in metric_list[0]}
