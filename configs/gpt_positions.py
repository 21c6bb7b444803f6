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
# Seeds per scheme (the sweep's default; `seeds=N` runs 0..N-1): with one, differences of a
# percent or two are noise.
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

  `arg` takes `seeds=N` (the seeds 0..N-1; default SEEDS) and get_config's `steps` and
  `seq_len`, passed to every point. A `seed=` would give every point the same seed, so it
  is refused.
  """
  if ',seed=' in f',{arg or ""}':
    raise ValueError('the sweep sets seed= per point; use seeds=N for the first N seeds')
  arg = common.parse_arg(arg, seeds=len(SEEDS), steps=STEPS, seq_len=TRAIN_LEN)
  if arg.seeds < 1:
    raise ValueError(f'seeds={arg.seeds}: the sweep needs at least one seed')
  shared = f'steps={arg.steps},seq_len={arg.seq_len}'
  return {point_name(scheme, seed): f'position={scheme},seed={seed},{shared}'
          for seed in range(arg.seeds) for scheme in SCHEMES}
