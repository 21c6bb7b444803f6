"""AdamW with warmup and decay, global-norm clipping and a weight-decay mask."""

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Built from `config.optimizer`; `num_steps` comes from `config.train`."""
  learning_rate: float
  warmup_steps: int
  decay: str = 'cosine'
  end_learning_rate_factor: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.decay not in DECAYS:
      raise ValueError(f'config.optimizer.decay={self.decay!r} is not one of {sorted(DECAYS)}')
    if self.warmup_steps < 0:
      raise ValueError(f'config.optimizer.warmup_steps={self.warmup_steps} must be >= 0')


# A decay maps (peak, end value, steps after warmup, warmup steps) to a schedule of the
# steps after warmup.


def _cosine(peak, end, steps, warmup):
  del warmup
  return optax.cosine_decay_schedule(peak, max(steps, 1), alpha=end / peak if peak else 0.0)


def _linear(peak, end, steps, warmup):
  del warmup
  return optax.linear_schedule(peak, end, max(steps, 1))


def _constant(peak, end, steps, warmup):
  del end, steps, warmup
  return optax.constant_schedule(peak)


def _rsqrt(peak, end, steps, warmup):
  """peak · sqrt(warmup / step): Vaswani et al. 2017's d^-0.5 · min(step^-0.5,
  step · warmup^-1.5) after its warmup, with the peak named instead of d^-0.5 · warmup^-0.5.
  Decays forever, so `end_learning_rate_factor` does not apply."""
  del end, steps
  warmup = max(warmup, 1)
  return lambda count: peak * jnp.sqrt(warmup / (warmup + count))


DECAYS = {'cosine': _cosine, 'linear': _linear, 'constant': _constant, 'rsqrt': _rsqrt}


def learning_rate_schedule(cfg: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then the configured decay to the end value."""
  peak = cfg.learning_rate
  end = peak * cfg.end_learning_rate_factor
  warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
  decay = DECAYS[cfg.decay](peak, end, num_steps - cfg.warmup_steps, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only; never on norms or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(cfg, num_steps)
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask),
  )
