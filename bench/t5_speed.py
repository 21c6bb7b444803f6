"""Our T5 v1.1 against Hugging Face's PyTorch T5ForConditionalGeneration: the train step, MFU.

  .venv/bin/python -m bench.t5_speed             # or: make bench BENCH=t5_speed
  .venv/bin/python -m bench.t5_speed --rounds=2 --steps=2 --peers=sdpa   # quick look

Both sides run the same model with the same weights: T5 v1.1 (pre-norm blocks with RMS
norms and no biases, attention logits unscaled, one relative position bias table per stack,
gated-GELU MLP (tanh GELU), one token table for source and target, an untied output
projection; by default 3 + 3 layers, width 256, 4 heads of 64, MLP 1024, vocabulary 8000).
Our model is models/encoder_decoder.py's `EncoderDecoder` with configs/t5.py's
`t5_model('1.1', ...)` fields; the driver builds a `T5ForConditionalGeneration` from
`hf.t5.config_to_hf` of that config, with transformers' own initialisation (seed 0), and
hands its state dict to every worker; ours imports it with `hf.t5.params_from_hf`.
transformers 5 ties T5's lm_head to the token table whatever the config says (hf/t5.py's
docstring), so the driver unties it as a v1.1 checkpoint has it: a parameter of its own,
drawn as transformers draws an untied one (N(0, 1)); every peer unties its model the same
way before loading the state. The first losses of the sides are checked equal.

Each side runs a train step on 32 pairs of 64 input and 16 target tokens (span
corruption's ratio at 15% noise; no padding; each side ends in EOS, decoder inputs are the
targets shifted right behind T5's start token, pad 0), float32, no dropout, cross-entropy
without label smoothing, AdamW (betas 0.9/0.98, eps 1e-9, weight decay 0.01 on matrices,
as bench/seq2seq_speed.py) with global-norm clipping at 1. Ours: objectives/seq2seq.py
through training/step.py's `train_step`. The peer: the model's logits from `input_ids`,
`attention_mask` (ones) and `decoder_input_ids` (use_cache off, as passing `labels` would
set it), then `torch.nn.functional.cross_entropy` (HF's own `labels` loss), `torch.optim.
AdamW`, `clip_grad_norm_`.

T5 in transformers takes attention 'sdpa' (its relative bias folded into SDPA's additive
mask) and 'eager' ('flex' too, which compiles; not a CPU peer): each runs in its own worker
(`--peers`), and the ratio is against the faster. Workers, turns and environments as in
bench/gpt_speed.py (bench/common.py): every side measures in turn, the first rotating each
round, and medians are reported. Printed (and written to docs/t5_speed.md):

  train tokens/s ours/peer = X     target tokens (batch × target length) per second
  CPU MFU = X%      model FLOPs/s of our train step / the best 2048² matmul rate

Model FLOPs count matmuls as gpt_speed does (PaLM's appendix B): 6 per matmul parameter per
token it acts on (the encoder's and the cross-attention keys/values' on input tokens; the
decoder's other projections, its gated MLP and the untied output projection on target
tokens), plus 12·D per (query, key) pair of each attention layer (encoder S², decoder self
T², cross T·S; the masked half of the causal one included).
"""

import argparse
import dataclasses
import statistics

import numpy as np

from bench import common

ADAMW = common.AdamW(learning_rate=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01,
                     clip_norm=1.0)
PAD, EOS, NUM_SPECIAL = 0, 1, 2  # T5's ids; decoding starts from pad
PEERS = ('sdpa', 'eager')
VERSION = '1.1'


@dataclasses.dataclass(frozen=True)
class Shape:
  """The benchmarked model and batch, identical on both sides."""
  layers: int = 3  # encoder and decoder each
  width: int = 256
  heads: int = 4  # of width / heads each (T5's d_kv)
  mlp: int = 1024
  vocab: int = 8000
  batch: int = 32
  source: int = 64
  target: int = 16

  @property
  def target_tokens_per_step(self) -> int:
    return self.batch * self.target

  def train_flops_per_step(self) -> float:
    d, f, layers = self.width, self.mlp, self.layers
    source_params = layers * (4 * d * d + 3 * d * f) + layers * 2 * d * d  # + cross k, v
    target_params = layers * (6 * d * d + 3 * d * f) + self.vocab * d  # + untied output
    matmuls = 6 * self.batch * (self.source * source_params + self.target * target_params)
    pairs = self.source**2 + self.target**2 + self.target * self.source
    return matmuls + 12 * d * layers * self.batch * pairs


def model_fields(shape: Shape) -> dict:
  """Our EncoderDecoderConfig fields: configs/t5.py's T5 v1.1 at `shape`, no dropout."""
  from configs import t5  # pylint: disable=g-import-not-at-top
  return t5.t5_model(VERSION, vocab_size=shape.vocab, max_len=max(shape.source, shape.target),
                     num_layers=shape.layers, num_heads=shape.heads, embed_dim=shape.width,
                     mlp_dim=shape.mlp, dropout_rate=0.0)


def hf_config(shape: Shape) -> dict:
  """The config.json of the benchmarked T5ForConditionalGeneration (`hf.t5.config_to_hf`
  of our config)."""
  from hf import t5 as hf_t5  # pylint: disable=g-import-not-at-top
  from models import encoder_decoder
  cfg = encoder_decoder.EncoderDecoderConfig(**model_fields(shape))
  return hf_t5.config_to_hf(cfg, bos_id=PAD, eos_id=EOS, pad_id=PAD)


def make_pairs(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
  """Source and target rows ending in EOS, and the decoder inputs (targets shifted right
  behind the start token, T5's pad): int64 [B, S] / [B, T]."""
  rng = np.random.default_rng(seed)
  sources = rng.integers(NUM_SPECIAL, shape.vocab, (shape.batch, shape.source))
  targets = rng.integers(NUM_SPECIAL, shape.vocab, (shape.batch, shape.target))
  sources[:, -1] = targets[:, -1] = EOS
  decoder_inputs = np.concatenate([np.full((shape.batch, 1), PAD), targets[:, :-1]], 1)
  return {'sources': sources, 'targets': targets, 'decoder_inputs': decoder_inputs}


def hf_model(config: dict, attention: str = 'eager'):
  """A T5ForConditionalGeneration of `config` with its lm_head untied (a parameter of its
  own; transformers 5 ties it, see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers
  model = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**config, attn_implementation=attention))
  model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  return model


def t5_state(config: dict) -> dict[str, np.ndarray]:
  """The model's state dict with transformers' initialisation (seed 0) and an untied
  lm_head drawn as transformers draws one (N(0, initializer_factor²)), numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = hf_model(config)
  with torch.no_grad():
    model.lm_head.weight.normal_(0.0, config['initializer_factor'])
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- our side


class Ours(common.JaxSide):
  """contextual's encoder-decoder as T5 v1.1, its seq2seq objective and real train step
  (training/step.py)."""

  def __init__(self, setup: tuple[Shape, dict[str, np.ndarray]]):
    import objectives  # pylint: disable=g-import-not-at-top
    from hf import t5 as hf_t5
    from models import encoder_decoder
    shape, state = setup
    cfg = encoder_decoder.EncoderDecoderConfig(**model_fields(shape))
    self.model = encoder_decoder.EncoderDecoder(cfg)
    params = hf_t5.params_from_hf(state, cfg)
    objective = objectives.build('seq2seq', {'label_smoothing': 0.0})
    batch = common.seq2seq_batch(**make_pairs(shape))
    self.init_train(self.model, params, objective.loss_fn, batch, ADAMW)

  def warm_up(self) -> None:
    self.train(1)  # Compiles, and warms the allocator.


# -------------------------------------------------------------------------- the peer


class Peer(common.TorchSide):
  """transformers' T5ForConditionalGeneration with cross-entropy and torch.optim.AdamW, as
  their docs train it."""

  def __init__(self, setup: tuple[Shape, dict, dict[str, np.ndarray], str]):
    import torch  # pylint: disable=g-import-not-at-top
    shape, config, state, attention = setup
    model = hf_model(config, attention)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    if model.lm_head.weight is model.shared.weight:
      raise RuntimeError('the peer ties its lm_head to the token table; T5 v1.1 does not')
    self.init_train(model.train(), ADAMW, model.config._attn_implementation)
    pairs = make_pairs(shape)
    self.features = {'input_ids': torch.from_numpy(pairs['sources']),
                     'attention_mask': torch.ones(pairs['sources'].shape, dtype=torch.int64),
                     'decoder_input_ids': torch.from_numpy(pairs['decoder_inputs'])}
    self.labels = torch.from_numpy(pairs['targets'])

  def warm_up(self) -> None:
    self.train(1)  # Warms the allocator.

  def step_loss(self):
    logits = self.model(**self.features, use_cache=False).logits
    return self._torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), self.labels.reshape(-1))


# ---------------------------------------------------------------------------- driver


def run(shape: Shape, rounds: int, steps: int, matmul_repeats: int, peers: tuple[str, ...],
        env: dict[str, dict[str, str | None]]) -> dict:
  """Measures every side in rotating rounds; returns the medians and derived ratios."""
  config = hf_config(shape)
  state = t5_state(config)
  specs = {'ours': (Ours, (shape, state), env['ours'])}
  specs.update({p: (Peer, (shape, config, state, p), env['peer']) for p in peers})
  with common.started(specs) as sides:
    info = {name: side('describe') for name, side in sides.items()}
    common.check_same_params(info)
    samples = common.measure_rounds(sides, rounds, matmul_repeats,
                                    {'train': (steps, 'train s/step')})
    losses = {name: side('loss') for name, side in sides.items()}
  common.check_first_losses(losses)
  return summarize(shape, samples, info, losses, peers=peers, env=env, rounds=rounds,
                   steps=steps)


def summarize(shape: Shape, samples: dict[tuple[str, str], list[float]], info: dict,
              losses: dict[str, float], *, peers: tuple[str, ...],
              env: dict[str, dict[str, str | None]], rounds: int, steps: int) -> dict:
  """The result of measured `samples` (`common.measure_rounds`'): medians, rates, ratios."""
  sides = ['ours', *peers]
  train_s = {n: statistics.median(samples[n, 'train']) for n in sides}
  peak = max(max(samples[n, 'matmul']) for n in sides)
  train_peer = min(peers, key=train_s.get)
  train_gflops = {n: shape.train_flops_per_step() / train_s[n] / 1e9 for n in sides}
  return {
      'shape': dataclasses.asdict(shape), 'version': VERSION, 'rounds': rounds,
      'steps': steps, 'adamw': dataclasses.asdict(ADAMW),
      'glibc_tunables': {'ours': env['ours'].get('GLIBC_TUNABLES'),
                         'peer': env['peer'].get('GLIBC_TUNABLES')},
      'frameworks': {n: info[n]['framework'] for n in sides},
      'params': info['ours']['params'], 'first_loss': losses,
      'train_s_per_step': train_s,
      'train_tokens_per_s': {n: shape.target_tokens_per_step / train_s[n] for n in sides},
      'train_peer': train_peer,
      'train_ratio': train_s[train_peer] / train_s['ours'],
      'train_model_gflops_per_s': train_gflops,
      'matmul_gflops_per_s': {n: max(samples[n, 'matmul']) for n in sides},
      'train_mfu': {n: train_gflops[n] / peak for n in sides},
  }


def report(result: dict, command: str, note: str = '') -> str:
  """The markdown page: what ran where, a table, and the headline lines."""
  s, names = result['shape'], list(result['frameworks'])
  titles = {'ours': 'ours (JAX)', **{p: f'peer {p} (PyTorch)' for p in PEERS}}

  def row(label, values, fmt, ratio='', unit=''):
    return common.table_row(label, values, names, fmt, ratio, unit)

  mfu = {n: 100 * v for n, v in result['train_mfu'].items()}
  lines = [
      *common.page_head('T5 speed: contextual vs Hugging Face transformers (PyTorch)',
                        command, note, result),
      (f'Model: T5 v{result["version"]} (pre-norm RMS blocks without biases, unscaled '
       f'attention logits, relative position buckets, gated-GELU MLP, shared token table, '
       f'untied output), {s["layers"]} + {s["layers"]} layers, width {s["width"]}, '
       f'{s["heads"]} heads, MLP {s["mlp"]}, vocabulary {s["vocab"]}, '
       f'{result["params"]:,} parameters on every side, the same weights (transformers\' '
       f'init, seed 0). Train: batch {s["batch"]} pairs of {s["source"]} input x '
       f'{s["target"]} target tokens, float32, no dropout, cross-entropy without label '
       f'smoothing, AdamW + clipping; tokens/s counts target tokens. Medians over '
       f'{result["rounds"]} rotating rounds of {result["steps"]} train steps. First losses: '
       + ', '.join(f'{n} {v:.4f}' for n, v in result['first_loss'].items()) + '.'), '',
      f'The ratio is against the faster peer: {result["train_peer"]}.', '',
      '| measure | ' + ' | '.join(titles[n] for n in names) + ' | ours/peer |',
      '|---|' + '---|' * (len(names) + 1),
      row('train step (s)', result['train_s_per_step'], '.3f'),
      row('train target tokens/s', result['train_tokens_per_s'], '.0f',
          f'{result["train_ratio"]:.2f}'),
      row('train model GFLOP/s', result['train_model_gflops_per_s'], '.1f'),
      row('train MFU (vs the best matmul)', mfu, '.1f', unit='%'),
      row('2048² matmul GFLOP/s (best)', result['matmul_gflops_per_s'], '.1f'),
      *common.page_tail(result, headline(result))]
  return '\n'.join(lines)


def headline(result: dict) -> list[str]:
  return [f'train tokens/s ours/peer = {result["train_ratio"]:.2f}',
          f'CPU MFU = {100 * result["train_mfu"]["ours"]:.1f}%']


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  common.add_run_arguments(parser, Shape, 't5_speed', peers=PEERS)
  args = parser.parse_args(argv)
  shape = common.shape_from_args(args, Shape)
  if shape.width % shape.heads:
    parser.error('--width must be a multiple of --heads (T5 d_kv = width / heads here)')
  peers = common.peers_from_args(parser, args, PEERS)
  env = dict(zip(('ours', 'peer'), common.tunables_env(args.peer_tunables)))
  result = run(shape, args.rounds, args.steps, args.matmul_repeats, peers, env)
  common.write_page('t5_speed', argv, args, result, report, headline)


if __name__ == '__main__':
  main()
