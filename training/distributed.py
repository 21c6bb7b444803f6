"""Multi-host start-up: every process calls `jax.distributed.initialize` before touching JAX.

On TPU pods and SLURM, `jax.distributed.initialize()` finds the coordinator, the process
count and this process's id by itself (`--distributed`); elsewhere they are given
(`--coordinator_address=host:port --num_processes=N --process_id=i`). After it, the mesh
spans every process's devices, each host feeds only its own rows (training.sharding), and
process 0 alone writes metrics.
"""

import jax


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, auto: bool = False) -> bool:
  """Joins the run's processes; returns whether this is a multi-process run."""
  given = [coordinator_address, num_processes, process_id]
  if not auto and all(v is None for v in given):
    return False
  if not auto and any(v is None for v in given):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together '
                     f'(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); '
                     'or pass --distributed on TPU pods and SLURM, which detect them')
  # CPU devices of different processes talk through gloo (the default has no
  # cross-process collectives); accelerators use their own (NCCL, ICI).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  return True
