"""What the speed benchmarks against a peer share: worker processes, turns, a matmul rate.

Each side (ours, a peer, ...) runs in a worker process of its own, started with its own
environment, so neither's thread pool competes with the other's and each runs with the
malloc settings it runs best with. The driver asks the workers for measurements in turns,
rotating who goes first each round, so a noisy machine slows every side alike.

A side is a class built as `cls(argument)` in its worker; it has `warm_up()` (compiling,
warming the allocator) and whatever methods the driver calls as `side(method, argument)`.
"""

import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import numpy as np

from training import metrics

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), 'docs')
MATMUL_N = 2048


def best_rate(matmul, repeats: int, n: int = MATMUL_N) -> float:
  """GFLOP/s of the fastest of `repeats` calls of an n x n x n matmul (after a warm-up)."""
  matmul()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def timed(fn, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `fn` (which must wait for its own results)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _worker(cls, argument, conn) -> None:
  """Builds one side and warms it up, then answers (method, argument) requests."""
  bench = cls(argument)
  bench.warm_up()
  conn.send('ready')
  while True:
    method, arg = conn.recv()
    if method is None:
      return
    conn.send(getattr(bench, method)(arg))


@contextlib.contextmanager
def environment(overrides: dict[str, str | None]):
  """os.environ with `overrides` (None removes a variable), for starting a worker."""
  saved = dict(os.environ)
  for name, value in overrides.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  try:
    yield
  finally:
    os.environ.clear()
    os.environ.update(saved)


class Side:
  """A worker process holding `cls(argument)`, started with its own environment, and a
  blocking call into it."""

  def __init__(self, cls, argument, env: dict[str, str | None]):
    context = multiprocessing.get_context('spawn')
    self.conn, child = context.Pipe()
    self.process = context.Process(target=_worker, args=(cls, argument, child), daemon=True)
    with environment(env):
      self.process.start()

  def wait_ready(self) -> None:
    if self.conn.recv() != 'ready':
      raise RuntimeError('worker failed to start')

  def __call__(self, method: str, argument=None):
    self.conn.send((method, argument))
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send((None, None))
    self.process.join(timeout=30)


@contextlib.contextmanager
def started(specs: dict[str, tuple]):
  """{name: Side} for {name: (cls, argument, env)}, each ready in turn (they would all
  compile at once otherwise), closed on exit."""
  sides = {name: Side(*spec) for name, spec in specs.items()}
  try:
    for side in sides.values():
      side.wait_ready()
    yield sides
  finally:
    for side in sides.values():
      side.close()


def round_order(names: list[str], r: int) -> list[str]:
  """The sides' order in round r: rotated by one each round (two sides: swapped)."""
  shift = r % len(names)
  return names[shift:] + names[:shift]


def tunables_env(peer_tunables: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
  """(ours, peer) environments: ours with the GLIBC_TUNABLES the Makefile exports, the
  peer with glibc's defaults ('default') or ours ('ours')."""
  ours = os.environ.get('GLIBC_TUNABLES')
  return ({'GLIBC_TUNABLES': ours},
          {'GLIBC_TUNABLES': ours if peer_tunables == 'ours' else None})


def machine_line() -> str:
  return f'Machine: {metrics.describe_machine()}, Python {platform.python_version()}'


def measure_rounds(sides: dict, rounds: int, matmul_repeats: int,
                   timed: dict[str, tuple[int, str]]) -> dict[tuple[str, str], list[float]]:
  """{(side, what): samples}: in each of `rounds` rounds, every side in turn (the first
  rotating) measures its best matmul rate ('matmul', GFLOP/s) and then each `what` of
  `timed` ({what: (repeats, label)}, a method returning seconds per call); a line of
  medians per round, the measures named by their labels."""
  samples = {(name, what): [] for name in sides for what in ('matmul', *timed)}
  for r in range(rounds):
    for name in round_order(list(sides), r):
      samples[name, 'matmul'].append(sides[name]('matmul', matmul_repeats))
      for what, (repeats, _) in timed.items():
        samples[name, what].extend(sides[name](what, repeats))
    labels = ', '.join(label for _, label in timed.values())
    print(f'round {r + 1}/{rounds}: {labels} ' + ', '.join(
        f'{name} ' + ', '.join(f'{statistics.median(samples[name, what]):.3f}'
                               for what in timed) for name in sides), flush=True)
  return samples


def check_same_params(info: dict[str, dict]) -> None:
  """Refuses sides (their `describe` answers) whose models differ in size."""
  if len({i['params'] for i in info.values()}) != 1:
    raise RuntimeError(f'the models differ: {info}')


def check_first_losses(losses: dict[str, float], atol: float = 1e-3) -> None:
  """Refuses sides whose first train steps computed different losses (not the same model,
  weights or batch)."""
  if max(losses.values()) - min(losses.values()) > atol:
    raise RuntimeError(f'the sides compute different first losses: {losses}')


# -------------------------------------------------------- the drivers' arguments and pages


def add_run_arguments(parser, shape_cls, name: str, *, per_round=(),
                      peers: tuple[str, ...] = ()) -> None:
  """A driver's arguments: an int --FIELD per field of the `shape_cls` dataclass, --rounds,
  --steps, each (flag, default, help) of `per_round` (more calls timed per round),
  --matmul_repeats, --peers (some of `peers`, when given), --out (docs/NAME.md), --note and
  --peer_tunables."""
  for field in dataclasses.fields(shape_cls):
    parser.add_argument(f'--{field.name}', type=int, default=field.default)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='train steps timed per round')
  for flag, default, what in per_round:
    parser.add_argument(f'--{flag}', type=int, default=default, help=what)
  parser.add_argument('--matmul_repeats', type=int, default=5)
  if peers:
    parser.add_argument('--peers', default=','.join(peers),
                        help="the peer's attention implementations, each a side of its own")
  parser.add_argument('--out', default=f'{DOCS}/{name}.md')
  parser.add_argument('--note', default='',
                      help='a line for the page (e.g. what else loaded the machine)')
  parser.add_argument('--peer_tunables', choices=('default', 'ours'), default='default',
                      help="the peer's glibc malloc settings (see bench/gpt_speed.py)")


def shape_from_args(args, shape_cls):
  """The `shape_cls` of the --FIELD arguments `add_run_arguments` added."""
  return shape_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(shape_cls)})


def peers_from_args(parser, args, peers: tuple[str, ...]) -> tuple[str, ...]:
  """The --peers named, some of `peers` (else the parser's error)."""
  chosen = tuple(args.peers.split(','))
  if not set(chosen) <= set(peers) or not chosen:
    parser.error(f'--peers must name some of {peers}')
  return chosen


def page_head(title: str, command: str, note: str, result: dict) -> list[str]:
  """A page's first lines: the title, the command, the machine, the note, the sides'
  frameworks and malloc settings (`result`'s 'frameworks' and 'glibc_tunables')."""
  tunables = result['glibc_tunables']
  return [
      f'# {title}', '',
      f'Command: `{command}`', '',
      machine_line(), '',
      *([note, ''] if note else []),
      'Sides: ' + '; '.join(f'{n}: {f}' for n, f in result['frameworks'].items()) + '.', '',
      (f'GLIBC_TUNABLES: ours {tunables["ours"] or "unset"}; peer '
       f'{tunables["peer"] or "unset"}.'), '']


def page_tail(result: dict, headline: list[str]) -> list[str]:
  """A page's last lines, after its table: what MFU is of, the headline, the result."""
  return ['', 'MFU percentages are of the best 2048² matmul rate of any side in this run.', '',
          '```', *headline, '```', '',
          '```json', json.dumps(result, indent=1), '```', '']


def write_page(name: str, argv, args, result: dict, report, headline) -> None:
  """Writes `report(result, command, note)` to --out and prints `headline(result)`; the
  command is `python -m bench.NAME` with `argv` (None: the process's)."""
  command = f'python -m bench.{name} ' + ' '.join(sys.argv[1:] if argv is None else argv)
  page = report(result, command.strip(), args.note)
  with open(args.out, 'w') as f:
    f.write(page)
  print('\n'.join(headline(result)))
  print(f'wrote {args.out}')


# ------------------------------------------------------------- training sides (BERT, ELECTRA)


@dataclasses.dataclass(frozen=True)
class AdamW:
  """The update both sides of a train benchmark make: AdamW at a constant learning rate,
  weight decay on matrices (kernels, embeddings) only, global-norm clipping first."""
  learning_rate: float
  betas: tuple[float, float]
  eps: float
  weight_decay: float
  clip_norm: float


def peer_masks(tokens: np.ndarray, vocab: int, *, special_ids: tuple[int, ...], mask_id: int,
               rate: float, mask_fraction: float, random_fraction: float,
               seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(corrupted inputs, labels with -100 where not labelled), [B, T] each, drawn once for
  a peer (a data collator's work): per row ⌊rate·n + u⌋ of its n non-special tokens
  labelled, `mask_fraction` of them [MASK], `random_fraction` a random ordinary token
  (ids above the special ones), the rest kept."""
  rng = np.random.default_rng(seed)
  inputs, labels = tokens.copy(), np.full_like(tokens, -100)
  for row in range(tokens.shape[0]):
    maskable = np.flatnonzero(~np.isin(tokens[row], special_ids))
    count = int(np.floor(rate * len(maskable) + rng.random()))
    chosen = rng.permutation(maskable)[:count]
    labels[row, chosen] = tokens[row, chosen]
    action = rng.random(count)
    inputs[row, chosen[action < mask_fraction]] = mask_id
    randomised = chosen[(action >= mask_fraction) & (action < mask_fraction + random_fraction)]
    inputs[row, randomised] = rng.integers(max(special_ids) + 1, vocab, len(randomised))
  return inputs, labels


def encoder_batch(tokens: np.ndarray, token_types: np.ndarray) -> dict:
  """Our encoders' batch of [B, T] tokens and token types: one sequence per row (segment
  ids 1, no padding), positions 0..T-1, int32."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ones = jnp.ones(tokens.shape, jnp.int32)
  return {'inputs': jnp.asarray(tokens, jnp.int32),
          'token_types': jnp.asarray(token_types, jnp.int32),
          'segment_ids': ones,
          'positions': jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                        ones.shape)}


def seq2seq_batch(sources: np.ndarray, decoder_inputs: np.ndarray, targets: np.ndarray) -> dict:
  """Our encoder-decoders' batch of [B, S] sources and [B, T] decoder inputs and targets:
  one pair per row (segment ids 1, no padding), positions from 0, int32."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  (batch, source), target = sources.shape, targets.shape[1]
  positions = lambda n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
  return {'inputs': jnp.asarray(sources, jnp.int32),
          'decoder_inputs': jnp.asarray(decoder_inputs, jnp.int32),
          'targets': jnp.asarray(targets, jnp.int32),
          'inputs_segment_ids': jnp.ones((batch, source), jnp.int32),
          'inputs_positions': positions(source),
          'targets_segment_ids': jnp.ones((batch, target), jnp.int32),
          'targets_positions': positions(target)}


def table_row(label: str, values: dict, names: list[str], fmt: str, ratio: str = '',
              unit: str = '') -> str:
  """A markdown row: `label`, each side's value in `names` ('-' for a side without one)
  formatted by `fmt`, then `ratio`."""
  cells = [format(values[n], fmt) + unit if n in values else '-' for n in names]
  return f'| {label} | ' + ' | '.join(cells) + f' | {ratio} |'


def labelled_positions(weights_BT, count: int):
  """(index_BM, take): the first `count` labelled positions of each row (labelled ones
  first), and a function gathering a [B, T, ...] array at them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  _, index_BM = jax.lax.top_k(weights_BT, count)
  take = lambda x: jnp.take_along_axis(x, index_BM.reshape(index_BM.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  return index_BM, take


def mlm_head_at(head: dict, table_VE, h_BMD, config):
  """models/bert.py's tied MLM head, LN(act(W h + b)) scored against the token table plus
  the output bias, at gathered hidden states; `head` holds its parameters (mlm_dense,
  mlm_ln, mlm_bias). For what-ifs: the model itself scores all T positions."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from models import layers
  dense, norm = head['mlm_dense'], head['mlm_ln']
  h_BME = layers.activation(config.activation)(h_BMD @ dense['kernel'] + dense['bias'])
  h_BME = layers.layer_norm(h_BME, norm['scale'], norm['bias'], config.norm_epsilon)
  return jnp.einsum('bme,ve->bmv', h_BME, table_VE) + head['mlm_bias']


class JaxSide:
  """Our side of a train benchmark: training/step.py's jitted `train_step` on one fixed
  batch. A subclass's __init__ builds its model, batch and loss and calls `init_train`."""

  def init_train(self, model, params, loss_fn, batch: dict, adamw: AdamW) -> None:
    """The train state of `params` (unboxed), the jitted step and the matmul probe."""
    import functools  # pylint: disable=g-import-not-at-top
    import jax
    import jax.numpy as jnp
    from training import optimizer as optimizer_lib
    from training import step as step_lib
    self._jax = jax
    self.batch = batch
    self.num_params = sum(p.size for p in jax.tree.leaves(params))
    optimizer = optimizer_lib.OptimizerConfig(
        learning_rate=adamw.learning_rate, warmup_steps=0, decay='constant',
        b1=adamw.betas[0], b2=adamw.betas[1], eps=adamw.eps,
        weight_decay=adamw.weight_decay, clip_norm=adamw.clip_norm)
    tx = optimizer_lib.make_optimizer(optimizer, num_steps=1)
    self.state = step_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    self.train_step = jax.jit(
        functools.partial(step_lib.train_step, loss_fn=loss_fn, model=model, seed=0,
                          learning_rate_fn=lambda step: adamw.learning_rate),
        donate_argnums=(0,))
    self.first_loss = None
    a = jnp.asarray(np.random.default_rng(1).normal(size=(MATMUL_N, MATMUL_N)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    self._matmul = lambda: matmul(a, a).block_until_ready()

  def describe(self, _) -> dict:
    return {'framework': f'jax {self._jax.__version__} ({self._jax.default_backend()})',
            'params': self.num_params}

  def matmul(self, repeats: int) -> float:
    return best_rate(self._matmul, repeats)

  def _step(self) -> None:
    self.state, step_metrics = self.train_step(self.state, self.batch)
    loss = float(step_metrics['loss'])  # Waits for the step.
    self.first_loss = loss if self.first_loss is None else self.first_loss

  def train(self, steps: int) -> list[float]:
    return timed(self._step, steps)

  def loss(self, _) -> float:
    return self.first_loss


class TorchSide:
  """A PyTorch peer's side of a train benchmark: `self.model` (a torch Module holding every
  trained parameter, shared ones once) stepped on `self.step_loss()`, the step's loss, with
  torch.optim.AdamW and clip_grad_norm_. A subclass's __init__ calls `init_train`."""

  def init_train(self, model, adamw: AdamW, attention: str) -> None:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers
    self._torch, self._transformers = torch, transformers
    self.model, self.attention, self._clip_norm = model, attention, adamw.clip_norm
    self.num_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    self.optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': adamw.weight_decay},
         {'params': no_decay, 'weight_decay': 0.0}],
        lr=adamw.learning_rate, betas=adamw.betas, eps=adamw.eps)
    self.first_loss = None
    a = torch.from_numpy(np.random.default_rng(1).normal(size=(MATMUL_N, MATMUL_N))).float()
    self._matmul = lambda: torch.mm(a, a)

  def describe(self, _) -> dict:
    return {'framework': (f'torch {self._torch.__version__}, transformers '
                          f'{self._transformers.__version__}, attention {self.attention}, '
                          f'{self._torch.get_num_threads()} threads'),
            'params': self.num_params}

  def matmul(self, repeats: int) -> float:
    return best_rate(self._matmul, repeats)

  def step_loss(self):
    raise NotImplementedError

  def _step(self) -> None:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.step_loss()
    loss.backward()
    self._torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._clip_norm)
    self.optimizer.step()
    loss = loss.item()
    self.first_loss = loss if self.first_loss is None else self.first_loss

  def train(self, steps: int) -> list[float]:
    self.model.train()
    return timed(self._step, steps)

  def loss(self, _) -> float:
    return self.first_loss
