"""Our GPT against Hugging Face's PyTorch GPT-2 on this machine: training, decoding, MFU.

  .venv/bin/python -m bench.gpt_speed               # or: make bench
  .venv/bin/python -m bench.gpt_speed --rounds=2 --steps=2 --new_tokens=32   # quick look

Both sides build the same model (GPT-2: pre-LN, learned positions, GELU-tanh, tied
embeddings; by default 4 layers, width 512, 8 heads, MLP 2048, vocabulary 8192), train on
the same batch shape (8 rows of 256 tokens) in float32 with the same update (AdamW, betas
0.9/0.95, weight decay 0.1, global-norm clipping at 1, no dropout), and decode the same
way (greedy, KV cache, 32 prompt tokens then up to max_len). Parameter counts are checked
to be equal before anything is timed.

Each framework runs in a worker process of its own, so neither's thread pool competes
with the other's, and each in the environment it runs best in: ours with the glibc malloc
settings the Makefile exports (GLIBC_TUNABLES: no page faults on XLA's per-step buffers),
the peer with glibc's defaults (the same settings slowed it; `--peer_tunables=ours`); the driver asks them for measurements in turns (ours first in even
rounds, the peer's in odd ones), so a noisy machine slows both alike, and reports medians.
Printed (and written to docs/gpt_speed.md):

  train tokens/s ours/peer = X
  CPU MFU = X%      model FLOPs/s of our step / the best large matmul rate of this machine
  decode tokens/s ours/peer = X

Model FLOPs count every matmul of the step the way PaLM's appendix B does: 6 per parameter
per token (forward + backward, the tied output projection included, the embedding lookup
not), plus 12·L·T·D per token for attention's two matmuls (the masked half included). The
matmul rate is the best of XLA's and PyTorch's on a 2048² float32 product, measured in
the same run.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

from bench import common

DOCS, MATMUL_N = common.DOCS, common.MATMUL_N
PROMPT_LEN = 32
CLIP_NORM, LEARNING_RATE, BETAS, WEIGHT_DECAY = 1.0, 1e-4, (0.9, 0.95), 0.1


@dataclasses.dataclass(frozen=True)
class Shape:
  """The benchmarked model and batch, identical on both sides."""
  layers: int = 4
  width: int = 512
  heads: int = 8
  mlp: int = 2048
  vocab: int = 8192
  seq: int = 256
  batch: int = 8

  @property
  def tokens_per_step(self) -> int:
    return self.batch * self.seq

  def train_flops_per_token(self) -> float:
    """Model FLOPs of one trained token: 6 per matmul parameter, plus attention's matmuls."""
    matmul_params = self.layers * (4 * self.width**2 + 2 * self.width * self.mlp)
    matmul_params += self.vocab * self.width  # The tied output projection.
    return 6 * matmul_params + 12 * self.layers * self.seq * self.width


# --------------------------------------------------------------------------- our side


class Ours:
  """contextual's GPT, its real train step (training/step.py) and generate()."""

  def __init__(self, shape: Shape):
    import functools  # pylint: disable=g-import-not-at-top
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from models import decoding
    from models import gpt
    from objectives import causal_lm
    from training import optimizer as optimizer_lib
    from training import step as step_lib
    self._jax, self._decoding = jax, decoding

    config = gpt.GPTConfig(vocab_size=shape.vocab, max_len=shape.seq, num_layers=shape.layers,
                           num_heads=shape.heads, embed_dim=shape.width, mlp_dim=shape.mlp)
    self.model = gpt.GPT(config)
    optimizer = optimizer_lib.OptimizerConfig(
        learning_rate=LEARNING_RATE, warmup_steps=0, decay='constant', b1=BETAS[0],
        b2=BETAS[1], weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM)
    tx = optimizer_lib.make_optimizer(optimizer, num_steps=1)
    tokens = np.random.default_rng(0).integers(7, shape.vocab, (shape.batch, shape.seq))
    self.batch = {
        'inputs': jnp.asarray(tokens, jnp.int32),
        'segment_ids': jnp.ones((shape.batch, shape.seq), jnp.int32),
        'positions': jnp.broadcast_to(jnp.arange(shape.seq, dtype=jnp.int32), tokens.shape),
    }
    params = nn.unbox(self.model.init(jax.random.key(0), self.batch['inputs'])['params'])
    self.num_params = sum(p.size for p in jax.tree.leaves(params))
    self.state = step_lib.TrainState.create(apply_fn=self.model.apply, params=params, tx=tx)
    self.train_step = jax.jit(
        functools.partial(step_lib.train_step, loss_fn=causal_lm.loss_fn, model=self.model,
                          seed=0, learning_rate_fn=lambda step: LEARNING_RATE),
        donate_argnums=(0,))
    self.prompts = self.batch['inputs'][:, :PROMPT_LEN]
    self.new_tokens = shape.seq - PROMPT_LEN
    self.first_loss = None
    a = jnp.asarray(np.random.default_rng(1).normal(size=(MATMUL_N, MATMUL_N)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    self._matmul = lambda: matmul(a, a).block_until_ready()

  def describe(self, _) -> dict:
    return {'framework': f'jax {self._jax.__version__} ({self._jax.default_backend()})',
            'params': self.num_params}

  def warm_up(self) -> None:
    self.train(1)  # Compiles (ours) and warms the allocator (both).
    self.decode(1)

  def matmul(self, repeats: int) -> float:
    return common.best_rate(self._matmul, repeats)

  def train(self, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.train_step(self.state, self.batch)
      loss = float(metrics['loss'])  # Waits for the step.
      times.append(time.perf_counter() - start)
      self.first_loss = loss if self.first_loss is None else self.first_loss
    return times

  def decode(self, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      out = self._decoding.generate(self.model, self.state.params, self.prompts,
                                    self._jax.random.key(0), max_new_tokens=self.new_tokens)
      np.asarray(out)  # Waits for the tokens.
      times.append(time.perf_counter() - start)
    return times

  def loss(self, _) -> float:
    return self.first_loss


# -------------------------------------------------------------------------- the peer


class Peer:
  """transformers' GPT2LMHeadModel, torch.optim.AdamW and `generate`, as their docs use them."""

  def __init__(self, shape: Shape):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers
    self._torch, self._transformers = torch, transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=shape.vocab, n_positions=shape.seq, n_embd=shape.width,
        n_layer=shape.layers, n_head=shape.heads, n_inner=shape.mlp,
        activation_function='gelu_new', resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    self.model = transformers.GPT2LMHeadModel(config).train()
    self.num_params = sum(p.numel() for p in self.model.parameters())
    decay = [p for p in self.model.parameters() if p.dim() >= 2]
    no_decay = [p for p in self.model.parameters() if p.dim() < 2]
    self.optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': WEIGHT_DECAY}, {'params': no_decay, 'weight_decay': 0.0}],
        lr=LEARNING_RATE, betas=BETAS, eps=1e-8)
    tokens = np.random.default_rng(0).integers(7, shape.vocab, (shape.batch, shape.seq))
    self.tokens = torch.from_numpy(tokens)
    self.prompts = self.tokens[:, :PROMPT_LEN]
    self.new_tokens = shape.seq - PROMPT_LEN
    self.first_loss = None
    a = torch.from_numpy(np.random.default_rng(1).normal(size=(MATMUL_N, MATMUL_N))).float()
    self._matmul = lambda: torch.mm(a, a)

  def describe(self, _) -> dict:
    return {'framework': (f'torch {self._torch.__version__}, transformers '
                          f'{self._transformers.__version__}, '
                          f'attention {self.model.config._attn_implementation}, '
                          f'{self._torch.get_num_threads()} threads'),
            'params': self.num_params}

  def warm_up(self) -> None:
    self.train(1)  # Warms the allocator.
    self.decode(1)

  def matmul(self, repeats: int) -> float:
    return common.best_rate(self._matmul, repeats)

  def train(self, steps: int) -> list[float]:
    torch, times = self._torch, []
    self.model.train()
    for _ in range(steps):
      start = time.perf_counter()
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
      self.optimizer.step()
      loss = loss.item()
      times.append(time.perf_counter() - start)
      self.first_loss = loss if self.first_loss is None else self.first_loss
    return times

  def decode(self, repeats: int) -> list[float]:
    torch, times = self._torch, []
    self.model.eval()
    with torch.inference_mode():
      for _ in range(repeats):
        start = time.perf_counter()
        self.model.generate(
            self.prompts, attention_mask=torch.ones_like(self.prompts), do_sample=False,
            max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, use_cache=True,
            pad_token_id=0, eos_token_id=None)
        times.append(time.perf_counter() - start)
    return times

  def loss(self, _) -> float:
    return self.first_loss


# ---------------------------------------------------------------------------- driver


def run(shape: Shape, rounds: int, steps: int, decodes: int, matmul_repeats: int,
        env: dict[str, dict[str, str | None]]) -> dict:
  """Measures both sides in alternating rounds; returns the medians and derived ratios."""
  specs = {'ours': (Ours, shape, env['ours']), 'peer': (Peer, shape, env['peer'])}
  with common.started(specs) as sides:
    info = {name: side('describe') for name, side in sides.items()}
    if info['ours']['params'] != info['peer']['params']:
      raise RuntimeError(f'the two models differ: {info}')
    samples = {(name, what): [] for name in sides for what in ('matmul', 'train', 'decode')}
    for r in range(rounds):
      for name in common.round_order(list(sides), r):
        samples[name, 'matmul'].append(sides[name]('matmul', matmul_repeats))
        samples[name, 'train'].extend(sides[name]('train', steps))
        samples[name, 'decode'].extend(sides[name]('decode', decodes))
      print(f'round {r + 1}/{rounds}: train s/step ours '
            f'{statistics.median(samples["ours", "train"]):.3f} peer '
            f'{statistics.median(samples["peer", "train"]):.3f}', flush=True)
    losses = {name: side('loss') for name, side in sides.items()}

  train_s = {n: statistics.median(samples[n, 'train']) for n in sides}
  decode_s = {n: statistics.median(samples[n, 'decode']) for n in sides}
  peak = {n: max(samples[n, 'matmul']) for n in sides}
  new_tokens = shape.batch * (shape.seq - PROMPT_LEN)
  ours_flops = shape.train_flops_per_token() * shape.tokens_per_step / train_s['ours']
  peer_flops = shape.train_flops_per_token() * shape.tokens_per_step / train_s['peer']
  return {
      'shape': dataclasses.asdict(shape), 'rounds': rounds, 'steps': steps,
      'glibc_tunables': {n: env[n].get('GLIBC_TUNABLES') for n in sides},
      'frameworks': {n: info[n]['framework'] for n in sides},
      'params': info['ours']['params'], 'first_loss': losses,
      'train_s_per_step': train_s,
      'train_tokens_per_s': {n: shape.tokens_per_step / train_s[n] for n in sides},
      'train_ratio': train_s['peer'] / train_s['ours'],
      'model_gflops_per_s': {'ours': ours_flops / 1e9, 'peer': peer_flops / 1e9},
      'matmul_gflops_per_s': {'xla': peak['ours'], 'torch': peak['peer']},
      'mfu': {'ours': ours_flops / 1e9 / max(peak.values()),
              'peer': peer_flops / 1e9 / max(peak.values())},
      'decode_s': decode_s,
      'decode_tokens_per_s': {n: new_tokens / decode_s[n] for n in sides},
      'decode_ratio': decode_s['peer'] / decode_s['ours'],
  }


def report(result: dict, command: str) -> str:
  """The markdown page: what ran where, a table, and the three headline lines."""
  s, t, d = result['shape'], result['train_tokens_per_s'], result['decode_tokens_per_s']
  g, m = result['model_gflops_per_s'], result['matmul_gflops_per_s']
  lines = [
      '# GPT speed: contextual vs Hugging Face transformers (PyTorch)', '',
      f'Command: `{command}`', '',
      common.machine_line(), '',
      f'Ours: {result["frameworks"]["ours"]}. Peer: {result["frameworks"]["peer"]}.', '',
      (f'GLIBC_TUNABLES: ours {result["glibc_tunables"]["ours"] or "unset"}; peer '
       f'{result["glibc_tunables"]["peer"] or "unset"}.'), '',
      (f'Model: {s["layers"]} layers, width {s["width"]}, {s["heads"]} heads, MLP {s["mlp"]}, '
       f'vocabulary {s["vocab"]}, {result["params"]:,} parameters on both sides; batch '
       f'{s["batch"]} x {s["seq"]} tokens, float32, AdamW + clipping. Medians over '
       f'{result["rounds"]} alternating rounds of {result["steps"]} steps. First losses: ours '
       f'{result["first_loss"]["ours"]:.4f}, peer {result["first_loss"]["peer"]:.4f}.'), '',
      '| measure | ours (JAX) | peer (PyTorch) | ours/peer |',
      '|---|---|---|---|',
      (f'| train step (s) | {result["train_s_per_step"]["ours"]:.3f} | '
       f'{result["train_s_per_step"]["peer"]:.3f} | |'),
      f'| train tokens/s | {t["ours"]:.0f} | {t["peer"]:.0f} | {result["train_ratio"]:.2f} |',
      f'| model GFLOP/s | {g["ours"]:.1f} | {g["peer"]:.1f} | |',
      f'| 2048² matmul GFLOP/s (best) | {m["xla"]:.1f} | {m["torch"]:.1f} | |',
      (f'| MFU (vs the best matmul) | {100 * result["mfu"]["ours"]:.1f}% | '
       f'{100 * result["mfu"]["peer"]:.1f}% | |'),
      (f'| decode tokens/s ({s["batch"]} rows, {PROMPT_LEN} prompt + '
       f'{s["seq"] - PROMPT_LEN} new) | {d["ours"]:.0f} | {d["peer"]:.0f} | '
       f'{result["decode_ratio"]:.2f} |'), '',
      '```', *headline(result), '```', '',
      '```json', json.dumps(result, indent=1), '```', '']
  return '\n'.join(lines)


def headline(result: dict) -> list[str]:
  return [f'train tokens/s ours/peer = {result["train_ratio"]:.2f}',
          f'CPU MFU = {100 * result["mfu"]["ours"]:.1f}%',
          f'decode tokens/s ours/peer = {result["decode_ratio"]:.2f}']


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for field in dataclasses.fields(Shape):
    parser.add_argument(f'--{field.name}', type=int, default=field.default)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='train steps timed per round')
  parser.add_argument('--decodes', type=int, default=1, help='generate calls timed per round')
  parser.add_argument('--matmul_repeats', type=int, default=5)
  parser.add_argument('--out', default=os.path.join(DOCS, 'gpt_speed.md'))
  parser.add_argument(
      '--peer_tunables', choices=('default', 'ours'), default='default',
      help="the peer's glibc malloc settings: its default, or ours (GLIBC_TUNABLES as the "
           'Makefile exports it), which slowed it here')
  args = parser.parse_args(argv)
  shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
  if shape.seq <= PROMPT_LEN:
    parser.error(f'--seq must exceed the {PROMPT_LEN}-token prompt')
  env = dict(zip(('ours', 'peer'), common.tunables_env(args.peer_tunables)))
  result = run(shape, args.rounds, args.steps, args.decodes, args.matmul_repeats, env)
  command = 'python -m bench.gpt_speed ' + ' '.join(sys.argv[1:] if argv is None else argv)
  page = report(result, command.strip())
  with open(args.out, 'w') as f:
    f.write(page)
  print('\n'.join(headline(result)))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
