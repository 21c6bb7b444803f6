"""Trains a model from a config; re-running the same command resumes from the last checkpoint.

  python train.py --config=configs/gpt.py:size=tiny --workdir=/tmp/gpt [--config.train.num_steps=50]
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from training import distributed
from training import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-host: host:port of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Multi-host with auto-detection (TPU pods, SLURM).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_DISTRIBUTED.value)
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
