"""Dense vs sliding-window vs block-sparse (BigBird) attention: time and memory by length.

  .venv/bin/python -m bench.attention            # or: make bench
  .venv/bin/python -m bench.attention --lengths=512,1024 --repeats=3

Forward + backward of causal self-attention (batch 1, 4 heads, head dim 64, float32) at
each length: the median of several timed runs after a warm-up, the sparse variants taking
turns so that a noisy machine slows them alike, dense in rounds of its own (its T·S
temporaries, a GB at T=4096, evict the caches: a sparse step timed right after it ran
20-60% slower, the more so the longer T); memory is XLA's temporary buffers of the
compiled step, and `*_faults` in the JSON the minor page faults of one step (XLA maps its
temporaries afresh for every step once they outgrow malloc's 32 MB mmap threshold, and
the OS zeroes each page on first touch: see GROWTH_NOTE). Prints a table, the ratio
dense / sparse, and each variant's growth per doubling of the length (2 = linear,
4 = quadratic); writes the same to docs/attention_bench.md. Dense is skipped where it
would need more than --max_gb of temporaries or its warm-up exceeds --max_seconds.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import attention
from models import block_sparse  # pylint: disable=unused-import  (registers the kernel)
from training import metrics

HEADS, HEAD_DIM, BLOCK = 4, 64, 64
VARIANTS = {
    # name: (kernel, pattern); sparse kernels take no dense mask, the pattern masks.
    'dense': ('xla', None),
    'window': ('block_sparse', attention.SlidingWindowMask(window=4 * BLOCK, causal=True,
                                                           block_size=BLOCK)),
    'bigbird': ('block_sparse', attention.BigBirdMask(block_size=BLOCK, window_blocks=1,
                                                      global_blocks=1, random_blocks=1,
                                                      causal=True)),
}


GROWTH_NOTE = """\
Reading the sparse `x2` columns: the compiled sparse steps do exactly twice the FLOPs and
bytes (XLA's cost analysis) per doubling of T, with the same ops at every T. What does not
scale linearly is memory around them. (1) XLA:CPU allocates a step's temporaries (the MB
columns) afresh on every call; with glibc's defaults, once they outgrow malloc's mmap
threshold (32 MB at most), each call maps new pages that the OS faults in and zeroes one by
one (`*_faults` in the JSON: about 256 per MB per step), which made the 1024 -> 2048
doubling cost x3.3-3.5. `make bench` runs with the Makefile's GLIBC_TUNABLES, which keep
that memory mapped: no faults at any T. (2) The doubling at which the temporaries outgrow
this machine's 32 MB L3 cache (lscpu) still costs more than x2: that the cache is the cause
is likely, not measured. (Until models/block_sparse.py computed each key block column on
its own, gathers and scatter-adds of K copies of the keys made every step slower.)"""


def _step(kernel, pattern, length):
  """Jitted forward + backward of one causal self-attention, and its compiled temp bytes."""

  def loss(q, k, v):
    mask = None
    if pattern is None:
      mask = attention.causal_mask(attention.sequence_index(1, length))
    out = attention.attend(q, k, v, mask_B1TS=mask, kernel=kernel, pattern=pattern)
    return jnp.sum(out)

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  shape = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32)
  compiled = step.lower(shape, shape, shape).compile()
  memory = compiled.memory_analysis()
  temp = getattr(memory, 'temp_size_in_bytes', None) if memory is not None else None
  return compiled, temp


def _time(compiled, args):
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def _time_and_faults(compiled, args):
  """Seconds and minor page faults (this process, all threads) of one step."""
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  seconds = _time(compiled, args)
  return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def run(lengths, repeats, max_gb, max_seconds):
  rows = []
  for length in lengths:
    rng = np.random.default_rng(length)
    args = [jnp.asarray(rng.normal(size=(1, length, HEADS, HEAD_DIM)), jnp.float32)
            for _ in range(3)]
    steps, notes, row = {}, {}, {'length': length}
    for name, (kernel, pattern) in VARIANTS.items():
      compiled, temp = _step(kernel, pattern, length)
      row[f'{name}_temp_mb'] = None if temp is None else temp / 2**20
      if temp is not None and temp > max_gb * 2**30:
        notes[name] = f'skipped: {temp / 2**30:.1f} GB of temporaries > {max_gb} GB'
        continue
      warmup = _time(compiled, args)
      if warmup > max_seconds:
        notes[name] = f'skipped: warm-up took {warmup:.0f} s > {max_seconds} s'
        continue
      steps[name] = compiled
    times = {name: [] for name in steps}
    faults = {name: [] for name in steps}
    sparse = [name for name in steps if VARIANTS[name][1] is not None]
    for group in (sparse, [name for name in steps if name not in sparse]):
      for _ in range(repeats if length < 4096 else max(3, repeats // 2)):
        for name in group:  # Taking turns: noise hits every variant.
          seconds, step_faults = _time_and_faults(steps[name], args)
          times[name].append(seconds)
          faults[name].append(step_faults)
    for name in VARIANTS:
      row[f'{name}_ms'] = 1e3 * statistics.median(times[name]) if name in times else None
      row[f'{name}_faults'] = statistics.median(faults[name]) if name in faults else None
    row['notes'] = notes
    rows.append(row)
    print(f'  length {length}: ' + ', '.join(
        f'{n} {row[f"{n}_ms"]:.1f} ms' if row[f'{n}_ms'] else f'{n} -' for n in VARIANTS),
          flush=True)
  return rows


def _fmt(value, spec='.1f'):
  return '-' if value is None else format(value, spec)


def table(rows) -> str:
  names = list(VARIANTS)
  sparse = [n for n in names if n != 'dense']
  header = (['T'] + [f'{n} ms' for n in names] + [f'dense/{n}' for n in sparse]
            + [f'{n} x2' for n in names] + [f'{n} MB' for n in names])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  previous = None
  for row in rows:
    cells = [str(row['length'])] + [_fmt(row[f'{n}_ms']) for n in names]
    for n in sparse:
      ratio = (row['dense_ms'] / row[f'{n}_ms']
               if row['dense_ms'] and row[f'{n}_ms'] else None)
      cells.append(_fmt(ratio, '.2f'))
    for n in names:  # Growth of the time per doubling of T: 2 linear, 4 quadratic.
      growth = None
      if previous and previous[f'{n}_ms'] and row[f'{n}_ms']:
        growth = row[f'{n}_ms'] / previous[f'{n}_ms']
      cells.append(_fmt(growth, '.2f'))
    cells += [_fmt(row[f'{n}_temp_mb'], '.0f') for n in names]
    lines.append('| ' + ' | '.join(cells) + ' |')
    previous = row
  notes = [f'- T={row["length"]} {name}: {note}' for row in rows
           for name, note in row['notes'].items()]
  return '\n'.join(lines + ([''] + notes if notes else []))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='512,1024,2048,4096,8192')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--max_gb', type=float, default=8.0)
  parser.add_argument('--max_seconds', type=float, default=60.0)
  parser.add_argument('--out', default='docs/attention_bench.md')
  args = parser.parse_args(argv)
  command = ' '.join([os.path.relpath(sys.executable), '-m', 'bench.attention']
                     + (argv if argv is not None else sys.argv[1:]))
  machine = metrics.describe_machine()
  print(f'$ {command}\n{machine}\nbatch 1, {HEADS} heads, head dim {HEAD_DIM}, float32, '
        f'causal; forward + backward; block {BLOCK}', flush=True)
  rows = run([int(x) for x in args.lengths.split(',')], args.repeats, args.max_gb,
             args.max_seconds)
  text = table(rows)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    settings = {name: repr(pattern) for name, (_, pattern) in VARIANTS.items()}
    with open(args.out, 'w') as f:
      f.write('# Attention benchmark: dense vs sliding window vs block-sparse (BigBird)\n\n'
              f'Command: `{command}`\n\nMachine: {machine}\n\n'
              f'Causal self-attention, batch 1, {HEADS} heads, head dim {HEAD_DIM}, float32; '
              'time per forward + backward (median after a warm-up, sparse variants '
              'taking turns, dense in rounds of its own); MB = XLA temporary buffers of '
              'the compiled step; `x2` = time '
              'growth per doubling of T (2 linear, 4 quadratic); `dense/x` = speed-up.\n\n'
              f'Variants: {json.dumps(settings)}\n\n{text}\n\n{GROWTH_NOTE}\n\n'
              f'```json\n{json.dumps(rows, indent=1)}\n```\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
