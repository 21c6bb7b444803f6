"""The training loop: build everything from the config, resume, train, evaluate, checkpoint.

`build` is shared with eval.py, so the evaluation of a checkpoint runs exactly the code the
training run used for its own periodic evaluation.
"""

import collections
import dataclasses
import functools
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np

from data import decoder_prefix_lm
from data import denoising_data
from data import encoder_data
from data import pipeline
from data import seq2seq_data
from data import tasks as tasks_lib
from data import text_to_text
import models
import objectives
from objectives import masking
from training import checkpoint
from training import metrics as metrics_lib
from training import optimizer as optimizer_lib
from training import preemption
from training import sharding
from training import step as step_lib
from training import translation


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a config determines: model, data, objective, optimizer and mesh."""
  config: ml_collections.ConfigDict
  model: nn.Module
  tokenizer: Any
  data: pipeline.DataConfig
  task: Any  # None: packed LM rows (data/pipeline.py); else a task of data/tasks.py
  objective: objectives.Objective
  mesh: Mesh
  rules: tuple
  tx: Any
  learning_rate_fn: Any

  @property
  def sample_inputs(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, self.data.seq_len), jnp.int32)

  def abstract_state(self):
    return step_lib.abstract_state(self.model, self.tx, self.sample_inputs, self.mesh, self.rules)


def build(config: ml_collections.ConfigDict, *, mesh_shape=None) -> Experiment:
  """Builds the experiment; `mesh_shape` overrides config.mesh.shape (eval on other devices)."""
  data_cfg = pipeline.DataConfig(**config.data)
  config_cls, model_cls = models.get(config.model_name)
  model_cfg = config_cls(**config.model)
  tokenizer = _prepare_once(lambda: pipeline.load_tokenizer(data_cfg))
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} tokens but config.model.vocab_size'
                     f' is {model_cfg.vocab_size}')
  mesh = sharding.make_mesh(mesh_shape or config.mesh.shape, config.mesh.axes)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  divisor = sharding.batch_divisor(mesh, rules)
  if data_cfg.batch_size % divisor or data_cfg.batch_size % jax.process_count():
    raise ValueError(f'config.data.batch_size={data_cfg.batch_size} must be divisible by the '
                     f'{divisor} ways the batch is split over the mesh and by the '
                     f'{jax.process_count()} hosts')
  # 'lm' and the pair tasks' rows are packed by their own pipelines; other tasks are
  # examples.
  task = None if data_cfg.task == 'lm' or is_pairs(data_cfg) else tasks_lib.get_task(
      data_cfg.task)
  objective = objectives.build(config.objective, config.get('objective_settings'),
                               tokenizer=tokenizer,
                               num_classes=getattr(task, 'num_classes', None))
  task = _with_static_masks(task, data_cfg, objective)
  opt_cfg = optimizer_lib.OptimizerConfig(**config.optimizer)
  num_steps = config.train.num_steps
  return Experiment(
      config=config, model=model_cls(model_cfg), tokenizer=tokenizer, data=data_cfg,
      task=task, objective=objective, mesh=mesh, rules=rules,
      tx=optimizer_lib.make_optimizer(opt_cfg, num_steps),
      learning_rate_fn=optimizer_lib.learning_rate_schedule(opt_cfg, num_steps))


def _with_static_masks(task, data_cfg: pipeline.DataConfig, objective: objectives.Objective):
  """The task with BERT's static masks (`data.dupe_factor` > 0) fixed in the pipeline."""
  if not data_cfg.dupe_factor:
    return task
  recipe = getattr(objective.settings, 'masking', objective.settings)
  if task is None or not isinstance(recipe, masking.MaskedLM):
    raise ValueError(f'config.data.dupe_factor={data_cfg.dupe_factor} fixes masked-LM masks in '
                     f'the pipeline; it needs a pretraining task and a masked-LM objective, not '
                     f'task {data_cfg.task!r} with objective {objective.name!r}')
  return dataclasses.replace(task, dupe_factor=data_cfg.dupe_factor,
                             mask_fn=functools.partial(masking.mask_example, settings=recipe))


def _prepare_once(load):
  """Process 0 prepares the data and tokenizer (if missing) before the others load them.

  Hosts usually share the data dir; preparing it from every process at once would race on
  the same files.
  """
  if jax.process_count() == 1:
    return load()
  if jax.process_index() == 0:
    load()
  multihost_utils.sync_global_devices('contextual: data prepared')
  return load()


def eval_fn(exp: Experiment, state_shardings):
  return step_lib.jit_eval_step(
      state_shardings.params, sharding.batch_sharding(exp.mesh, exp.rules),
      loss_fn=exp.objective.loss_fn, model=exp.model)


def evaluate(exp: Experiment, params, batches, step_fn) -> dict[str, float]:
  """The objective's report over a whole split (`batches` as from `pipeline.eval_batches`)."""
  batch_sharding = sharding.batch_sharding(exp.mesh, exp.rules)
  totals, throttle = None, Throttle()
  for batch in batches:
    batch = sharding.global_batch(batch, batch_sharding)
    if totals is None:
      shapes = jax.eval_shape(lambda p, b: exp.objective.loss_fn(
          p, b, jax.random.key(0), model=exp.model, deterministic=True)[1], params, batch)
      totals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    totals = step_fn(params, batch, totals)
    throttle(totals)
  if totals is None:
    raise ValueError(f'no evaluation batches: the split of {exp.data.name or exp.data.files} is empty')
  return exp.objective.summarize(jax.device_get(totals))


class Throttle:
  """Keeps at most `depth` dispatched steps in flight.

  Async dispatch lets the host run ahead of the devices. XLA's CPU backend runs the
  per-device parts of a program as tasks on a small thread pool, and with several programs
  in flight their cross-device collectives can wait on each other forever; so on CPU we
  wait for step k before dispatching step k+2. Accelerators keep a deeper queue.
  """

  def __init__(self, depth: int | None = None):
    self.depth = depth or (1 if jax.default_backend() == 'cpu' else 4)
    self._queue = collections.deque()

  def __call__(self, outputs) -> None:
    self._queue.append(outputs)
    while len(self._queue) > self.depth:
      jax.block_until_ready(self._queue.popleft())


def process_rows(exp: Experiment) -> np.ndarray:
  """The rows of every global batch that this process feeds, in the order it feeds them.

  `sharding.global_batch` (jax.make_array_from_process_local_data) takes from each process
  the rows that its addressable devices hold under the batch sharding, concatenated in
  increasing order; every host's pipeline packs the same global batch and keeps exactly
  these rows. Derived from the sharding, so any mesh and any logical_axis_rules work
  (rows replicated over some mesh axes are fed by every process holding them).
  """
  shape = (exp.data.batch_size, exp.data.seq_len)
  batch_sharding = sharding.batch_sharding(exp.mesh, exp.rules)
  indices = batch_sharding.addressable_devices_indices_map(shape).values()
  # The batch sharding splits rows only (sharding.batch_sharding): each process feeds
  # whole rows.
  rows = sorted({index[0].indices(shape[0]) for index in indices})
  return np.concatenate([np.arange(*r) for r in rows])


def is_pairs(data_cfg: pipeline.DataConfig) -> bool:
  """Whether the rows are packed (source, target) pairs: translation pairs, a mixture of
  text-to-text tasks or the corrupted documents of encoder-decoder pretraining."""
  return (data_cfg.task in ('seq2seq', 'text_to_text')
          or data_cfg.task in pipeline.DENOISING_TASKS)


def pair_task(data_cfg: pipeline.DataConfig, tokenizer) -> seq2seq_data.PairTask | None:
  """What makes the pairs: the task's corruption, or (None) the records' own pairs."""
  if data_cfg.task in pipeline.DENOISING_TASKS:
    return denoising_data.denoising_task(data_cfg, tokenizer)
  return None


# Decoder-only families: they read an encoder-decoder pretraining task's examples as
# single rows, the inputs a prefix to the targets (data/decoder_prefix_lm.py).
DECODER_ONLY = ('gpt',)


def is_decoder_prefix_lm(exp: Experiment) -> bool:
  """Whether a decoder-only model reads a denoising task's examples as prefix-LM rows
  (T5's prefix LM decoder; only task 'prefix_lm' makes them, others fail there)."""
  return exp.data.task in pipeline.DENOISING_TASKS and exp.config.model_name in DECODER_ONLY


def train_iterator(exp: Experiment, rows: np.ndarray):
  """This process's rows of every training batch: packed LM rows, packed sequence pairs,
  prefix-LM rows or the task's examples."""
  if is_decoder_prefix_lm(exp):
    return decoder_prefix_lm.train_iterator(exp.data, exp.tokenizer, rows=rows)
  if exp.data.task == 'text_to_text':
    return text_to_text.train_iterator(exp.data, exp.tokenizer, rows=rows)
  if is_pairs(exp.data):
    return seq2seq_data.train_iterator(exp.data, exp.tokenizer, rows=rows,
                                       task=pair_task(exp.data, exp.tokenizer))
  if exp.task is None:
    return pipeline.train_iterator(exp.data, exp.tokenizer, rows=rows)
  return encoder_data.task_train_iterator(exp.task, exp.data, exp.tokenizer, rows=rows)


def eval_split(exp: Experiment, split: str) -> list[dict[str, np.ndarray]]:
  if is_decoder_prefix_lm(exp):
    batches = decoder_prefix_lm.eval_batches(exp.data, exp.tokenizer, split,
                                             rows=process_rows(exp),
                                             max_batches=exp.config.train.eval_batches)
  elif exp.data.task == 'text_to_text':  # every task's examples of the split
    batches = text_to_text.eval_batches(exp.data, exp.tokenizer, split, rows=process_rows(exp),
                                        max_batches=exp.config.train.eval_batches)
  elif is_pairs(exp.data):
    batches = seq2seq_data.eval_batches(exp.data, exp.tokenizer, split, rows=process_rows(exp),
                                        max_batches=exp.config.train.eval_batches,
                                        task=pair_task(exp.data, exp.tokenizer))
  elif exp.task is None:
    batches = pipeline.eval_batches(exp.data, exp.tokenizer, split, rows=process_rows(exp),
                                    max_batches=exp.config.train.eval_batches)
  else:
    batches = encoder_data.task_eval_batches(exp.task, exp.data, exp.tokenizer, split,
                                             rows=process_rows(exp),
                                             max_batches=exp.config.train.eval_batches)
  return list(batches)


def translation_scores(exp: Experiment, params) -> dict[str, float]:
  """BLEU and chrF of beam search on the first `translate.eval_examples` validation pairs
  (a seq2seq run whose config asks for them; a text-to-text run: each task's metrics,
  'task/metric'), else nothing."""
  settings = translate_settings(exp.config)
  if settings is None or not settings.eval_examples:
    return {}
  report, _ = translation.evaluate(exp, params, 'validation', settings, settings.eval_examples)
  if exp.data.task == 'text_to_text':
    return {k: report[k] for k in translation.task_score_names(exp.data)}
  return {k: report[k] for k in ('bleu', 'chrf')}


def translate_settings(config: ml_collections.ConfigDict) -> translation.TranslateConfig | None:
  """The config's decoding settings (its `translate` block), if it has them."""
  if 'translate' not in config:
    return None
  return translation.TranslateConfig(**config.translate)


def _tokens(batch: dict[str, np.ndarray]) -> int:
  """The real tokens of a batch that a step predicts: the targets' for sequence pairs."""
  segment_ids = batch['segment_ids'] if 'segment_ids' in batch else batch['targets_segment_ids']
  return int(np.sum(segment_ids != 0))


def init_from(workdir: str, params, param_shardings, step: int | None = None):
  """`params` with the checkpoint at `step` (default: the latest) of the run in `workdir`
  grafted in.

  The source's parameter tree goes where it fits: at the root (continuing a run of the same
  model) or under the one top-level scope it matches (a pretrained BERT under a
  classifier's 'bert'). Parameters the source lacks (a fresh head) keep their
  initialisation and are listed; any shape that differs is an error naming it.
  """
  source_config = ml_collections.ConfigDict(
      checkpoint.read_json(os.path.join(workdir, 'config.json')))
  source = build(source_config, mesh_shape=[-1] + [1] * (len(source_config.mesh.axes) - 1))
  abstract, shardings = source.abstract_state()
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    if step:
      if step not in mngr.all_steps():
        raise FileNotFoundError(f'config.train.init_step={step}: {workdir} has checkpoints '
                                f'at steps {sorted(mngr.all_steps())} only')
      state = checkpoint.restore(mngr, step, abstract, shardings)
    else:
      state, step = checkpoint.restore_latest(mngr, abstract, shardings, move_damaged=False)
  finally:
    mngr.close()
  if state is None:
    raise FileNotFoundError(f'config.train.init_from={workdir!r}: no readable checkpoint')
  # What the source hands on to an encoder (ELECTRA: its discriminator alone).
  source_params = models.encoder_params(source_config.model_name, jax.device_get(state.params))
  scope = graft_scope(params, source_params)
  target = params if scope is None else params[scope]
  problems = [p for p in checkpoint.mismatched_parameters(source_params, target)
              if 'not in the checkpoint' not in p]
  if problems:
    raise checkpoint.IncompatibleCheckpointError(
        f'config.train.init_from={workdir!r} does not fit this model:\n  ' + '\n  '.join(problems))
  fresh = [p.split(':')[0] for p in checkpoint.mismatched_parameters(source_params, target)]
  grafted = _fill(target, source_params)
  if scope is not None:
    grafted = {**params, scope: grafted}
    fresh += [name for name in params if name != scope]
  print(f'Initialised from {workdir} (step {step})' + (f'{" under " + scope if scope else ""}; '
        f'fresh: {", ".join(fresh)}' if fresh else '.'), flush=True)
  return jax.device_put(grafted, param_shardings)


def graft_scope(params, source_params) -> str | None:
  """None if the source's top-level names are the target's own, else the one target scope
  whose children they are."""
  if set(source_params) <= set(params):
    return None
  scopes = [name for name, child in params.items()
            if isinstance(child, dict) and set(source_params) <= set(child)]
  if len(scopes) != 1:
    raise checkpoint.IncompatibleCheckpointError(
        f'the checkpoint\'s parameters {sorted(source_params)} fit no single scope of this '
        f'model {sorted(params)}')
  return scopes[0]


def _fill(target, source):
  """`target`'s tree with `source`'s leaves wherever source has them."""
  if not isinstance(target, dict):
    return source
  return {k: _fill(v, source[k]) if k in source else v for k, v in target.items()}


def check_workdir(workdir: str) -> None:
  """Fails before any compute if the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f'--workdir={workdir} is not writable: {e}') from e


class NonFiniteError(FloatingPointError):
  """A step produced a NaN or Inf loss or gradient."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to `config.train.num_steps`, resuming from the latest good checkpoint in `workdir`.

  Returns the final validation report. On SIGTERM it saves the current step and returns
  early (`Preempted` is printed); on a non-finite step it stops (NonFiniteError) or skips
  the update, as `config.train.on_nonfinite` says.
  """
  check_workdir(workdir)
  exp = build(config)
  train_cfg = config.train
  if train_cfg.on_nonfinite not in ('stop', 'skip'):
    raise ValueError(f"config.train.on_nonfinite={train_cfg.on_nonfinite!r} must be 'stop' "
                     "or 'skip'")
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  # Every process packs the same global batch and keeps its own rows of it, so the run does
  # not depend on how many processes feed it.
  rows = process_rows(exp)
  data_iter = train_iterator(exp, rows)
  abstract, state_shardings = exp.abstract_state()
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), keep=train_cfg.keep_checkpoints,
                            writer=True)
  state, start = checkpoint.restore_latest(mngr, abstract, state_shardings, data_iter)
  if state is None:
    rng = jax.random.key(config.seed)
    state, _ = step_lib.create_state(rng, exp.model, exp.tx, exp.sample_inputs, exp.mesh, exp.rules)
    if train_cfg.get('init_from'):
      state = state.replace(params=init_from(train_cfg.init_from, state.params,
                                             state_shardings.params,
                                             train_cfg.get('init_step') or None))
    start = 0
  else:
    print(f'Resumed from {mngr.directory} at step {start}.', flush=True)

  batch_sharding = sharding.batch_sharding(exp.mesh, exp.rules)
  train_step = step_lib.jit_train_step(
      state_shardings, batch_sharding, loss_fn=exp.objective.loss_fn, model=exp.model,
      seed=config.seed, learning_rate_fn=exp.learning_rate_fn,
      microbatches=config.train.microbatches)
  eval_step = eval_fn(exp, state_shardings)
  valid_batches = eval_split(exp, 'validation')
  writer = metrics_lib.MetricWriter(workdir)
  log = _TrainLog(exp, writer, train_cfg.on_nonfinite)
  bar = metrics_lib.progress_bar(start, train_cfg.num_steps)
  report, throttle = {}, Throttle()
  try:
    with jax.set_mesh(exp.mesh), preemption.Preemption(train_cfg.preemption_grace_seconds) as pre:
      for step in range(start + 1, train_cfg.num_steps + 1):
        batch = next(data_iter)
        state, step_metrics = train_step(state, sharding.global_batch(batch, batch_sharding))
        log.add(step, step_metrics,  # this host's tokens, scaled to the global batch
                tokens=_tokens(batch) * exp.data.batch_size / len(rows))
        throttle(step_metrics)
        bar.update(1)

        final = step == train_cfg.num_steps
        preempted = pre.requested  # read once: the signal may land at any moment
        boundary = {
            'log': step % train_cfg.log_every == 0 or final,
            'eval': step % train_cfg.eval_every == 0 or final,
            'save': step % train_cfg.checkpoint_every == 0 or final or preempted,
        }
        if any(boundary.values()):
          # Before anything is evaluated or saved: stop here if a step went non-finite.
          summary = log.flush(write=boundary['log'])
          if summary:
            bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}")
        if boundary['eval']:
          report = evaluate(exp, state.params, valid_batches, eval_step)
          report.update(translation_scores(exp, state.params))
          writer.write(step, 'validation', report)
          bar.write(f'step {step}: validation ' + _format(report))
        if boundary['save']:
          checkpoint.save(mngr, step, state, data_iter, config.to_dict())
        if preempted:
          mngr.wait_until_finished()
          bar.write(f'Preempted: saved step {step}; re-run the same command to continue.')
          break
        log.restart_clock()  # throughput counts training alone, not evaluation or saving
  finally:
    # Whatever stopped the loop, checkpoints already started are completed and committed.
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return report


class _TrainLog:
  """Collects per-step metrics on device; checks each step once; writes windowed summaries."""

  def __init__(self, exp: Experiment, writer: metrics_lib.MetricWriter, on_nonfinite: str):
    self._exp, self._writer, self._on_nonfinite = exp, writer, on_nonfinite
    self._pending: list[tuple[int, dict]] = []  # on device, not yet checked
    self._good: list[dict] = []                 # checked, on host, not yet written
    self._last_step = 0
    self._tokens = 0.0
    self.skipped = 0
    self.restart_clock()

  def restart_clock(self) -> None:
    if not self._pending and not self._good:
      self._tokens, self._tick = 0.0, time.perf_counter()

  def add(self, step: int, metrics: dict, tokens: float) -> None:
    self._pending.append((step, metrics))
    self._tokens += float(tokens)

  def flush(self, write: bool) -> dict[str, float] | None:
    """Checks the new steps; with `write`, logs the window's summary and starts a new one."""
    for step, m in jax.device_get(self._pending):
      self._last_step = step
      # The loss first: a non-finite loss explains the gradients that follow from it.
      bad = [name for name in sorted(m['finite'], key=lambda n: (n != 'loss', n))
             if not m['finite'][name]]
      if not bad:
        self._good.append(m)
      elif self._on_nonfinite == 'skip':
        self.skipped += 1
      else:
        raise NonFiniteError(
            f'step {step}: {bad[0]} is not finite ({len(bad)} non-finite quantities: '
            f'{", ".join(bad[:5])}{", ..." if len(bad) > 5 else ""}). The update was not '
            'applied and nothing after the last checkpoint was saved; set '
            'config.train.on_nonfinite=skip to skip such steps instead.')
    self._pending = []
    if not write:
      return None
    summary = {}
    if self._good:
      summary = self._exp.objective.summarize(
          step_lib.sum_metrics([m['sums'] for m in self._good]))
      summary.update(grad_norm=float(self._good[-1]['grad_norm']),
                     learning_rate=float(self._good[-1]['learning_rate']))
    summary['tokens_per_sec'] = self._tokens / max(time.perf_counter() - self._tick, 1e-9)
    summary['skipped_steps'] = float(self.skipped)
    self._writer.write(self._last_step, 'train', summary)
    had_good, self._good = bool(self._good), []
    self.restart_clock()
    return summary if had_good else None


def _format(report: dict[str, float]) -> str:
  return ' '.join(f'{k}={v:.4g}' for k, v in report.items())
