"""The positional-scheme study: one small GPT, trained at length L with each scheme and seed.

  python train.py --config=configs/gpt_positions.py:position=rope,seed=1 --workdir=/tmp/rope
  python -m training.sweep --config=configs/gpt_positions.py --workdir=workdirs/positions
  python -m training.sweep --config=configs/gpt_positions.py:seeds=1,steps=50 --workdir=/tmp/p
  make positions   # the sweep, its evaluation at L, 2L, 4L and docs/positions.md

Every point is `configs/gpt.py` at size 'tiny' with the overrides below, so the points
differ in `model.position` and the seed and nothing else: same steps, width and data. The
seed sets both the model's initialisation (`seed`) and the order of the training data
(`data.seed`); the validation data does not depend on it.

The sweep runs every scheme with every seed in SEEDS (`seeds=N` in the sweep argument: the
first N seeds, 0..N-1). Point `<scheme>-s<seed>` (e.g. `rope-s0`) trains into
WORKDIR/<scheme>-s<seed>; the points are listed seed by seed, so an interrupted sweep has
whole seeds of every scheme done first.
"""

import ml_collections

from configs import common
from configs import gpt

# Every scheme registered in models/positions.py, in the order the table lists them.
SCHEMES = ('none', 'learned', 'sinusoidal', 'shaw', 't5', 'rope', 'alibi', 'deberta')
# Seeds per scheme: with one, differences of a percent or two are noise.
SEEDS = (0, 1, 2)

# Sized to train in a minute or two on a shared 2-core CPU.
TRAIN_LEN = 64          # L: the evaluation also runs at 2L and 4L
STEPS = 500
BATCH = 32
EVAL_TOKENS = 32_768    # validation tokens per evaluation, at every length


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, position='rope', seed=0, steps=STEPS, seq_len=TRAIN_LEN)
  config = gpt.get_config('size=tiny')
  config.unlock()
  config.seed = arg.seed  # parameter init (and any per-step randomness)
  config.data.update(vocab_size=512, seq_len=arg.seq_len, batch_size=BATCH,
                     seed=arg.seed)  # order of the training records and rows
  config.model.update(num_layers=2, num_heads=2, embed_dim=64, mlp_dim=256,
                      position=arg.position)
  config.optimizer.warmup_steps = max(1, arg.steps // 20)
  config.train.update(
      num_steps=arg.steps, log_every=max(1, arg.steps // 20), eval_every=arg.steps,
      checkpoint_every=max(1, arg.steps // 3), keep_checkpoints=1,
      # Whole batches of about EVAL_TOKENS tokens; length_eval keeps the token count fixed.
      eval_batches=max(1, EVAL_TOKENS // (BATCH * arg.seq_len)))
  config.lock()
  return config


def point_name(scheme: str, seed: int) -> str:
  return f'{scheme}-s{seed}'


def sweep(arg: str | None = None) -> dict[str, str]:
  """{point name: get_config argument}: one point per (seed, scheme).

  `arg` is passed to each point, except `seeds=N`, which picks the seeds 0..N-1 instead of
  SEEDS. A `seed=` would give every point the same seed, so it is refused.
  """
  seeds, rest = SEEDS, []
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key == 'seed':
      raise ValueError('the sweep sets seed= per point; use seeds=N for the first N seeds')
    if key == 'seeds':
      seeds = tuple(range(int(value)))
    else:
      rest.append(item)
  if not seeds:
    raise ValueError(f'seeds={len(seeds)}: the sweep needs at least one seed')
  extra = ''.join(f',{item}' for item in rest)
  return {point_name(scheme, seed): f'position={scheme},seed={seed}{extra}'
          for seed in seeds for scheme in SCHEMES}
