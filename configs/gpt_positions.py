"""The positional-scheme study: one small GPT, trained at length L with each scheme.

  python train.py --config=configs/gpt_positions.py:position=rope --workdir=/tmp/rope
  python -m training.sweep --config=configs/gpt_positions.py --workdir=workdirs/positions
  make positions   # the sweep, its evaluation at L, 2L, 4L and docs/positions.md

Every point is `configs/gpt.py` at size 'tiny' with the overrides below, so the schemes
differ in `model.position` and nothing else: same seed, data order, steps and width.
"""

import ml_collections

from configs import common
from configs import gpt

# Every scheme registered in models/positions.py, in the order the table lists them.
SCHEMES = ('none', 'learned', 'sinusoidal', 'shaw', 't5', 'rope', 'alibi', 'deberta')

# Sized to train in a minute or two on a shared 2-core CPU.
TRAIN_LEN = 64          # L: the evaluation also runs at 2L and 4L
STEPS = 500
BATCH = 32
EVAL_TOKENS = 32_768    # validation tokens per evaluation, at every length


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, position='rope', steps=STEPS, seq_len=TRAIN_LEN)
  config = gpt.get_config('size=tiny')
  config.unlock()
  config.data.update(vocab_size=512, seq_len=arg.seq_len, batch_size=BATCH)
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


def sweep(arg: str | None = None) -> dict[str, str]:
  """{point name: get_config argument}: one point per scheme; `arg` is passed to each."""
  extra = f',{arg}' if arg else ''
  return {name: f'position={name}{extra}' for name in SCHEMES}
