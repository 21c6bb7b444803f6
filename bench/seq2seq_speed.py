"""Our encoder-decoder against Hugging Face's PyTorch MarianMTModel: training, beam search, MFU.

  .venv/bin/python -m bench.seq2seq_speed            # or: make bench BENCH=seq2seq_speed
  .venv/bin/python -m bench.seq2seq_speed --rounds=2 --steps=2 --peers=sdpa   # quick look

Both sides run the same model with the same weights: the 2017 Transformer as Marian has it
(post-LN, ReLU, unit sinusoids in Marian's [sin | cos] layout, one token table for source,
target and output, embeddings × sqrt(D); by default 3 + 3 layers, width 256, 4 heads, MLP
1024, vocabulary 8000). The driver builds a `MarianMTModel` from `hf.marian.config_to_hf`
of our config, with transformers' own initialisation (seed 0) and hands its state dict to
every worker; ours imports it with `hf.marian.params_from_hf`. The first losses of the
sides are checked equal. Each side runs:

- a train step on 32 sentence pairs of 64 source and 64 target tokens (no padding; each
  side ends in EOS, decoder inputs are the targets shifted right behind Marian's start
  token), float32, no dropout, label-smoothed cross-entropy (ε = 0.1), AdamW (betas
  0.9/0.98 and eps 1e-9 as Vaswani et al., weight decay 0.01 on matrices) with
  global-norm clipping at 1. Ours: models/encoder_decoder.py's `EncoderDecoder` with
  objectives/seq2seq.py through training/step.py's `train_step`. The peer: the model's
  logits from `input_ids`, `attention_mask` (ones) and `decoder_input_ids` (use_cache off,
  as passing `labels` would set it), then `torch.nn.functional.cross_entropy(...,
  label_smoothing=0.1)` (HF's own `labels` loss has no smoothing), `torch.optim.AdamW`,
  `clip_grad_norm_`.
- beam search, beam 4, on the first 8 sources of that batch: exactly 32 new tokens per
  source on both sides, EOS disabled (ours: `eos_id=-1`, an id no token has; the peer:
  `eos_token_id=None`), so both run 32 decoder steps over 32 beams; length penalty 0 on
  both. Ours: models/seq2seq_decoding.py's `translate(beam_size=4)` (one jitted function:
  encode, prime the cache, the search); the peer: `generate(num_beams=4,
  max_new_tokens=32)` under inference_mode. The share of sources whose best hypotheses
  are the same on both sides is printed (the weights are the same; near-ties of a random
  model may still part them).

The peer runs with attention 'sdpa' and 'eager', each in its own worker (`--peers`); each
ratio is against the faster of the two on that measure. Workers, turns and environments as
in bench/gpt_speed.py (bench/common.py): every side measures in turn, the first rotating
each round, and medians are reported. Printed (and written to docs/seq2seq_speed.md):

  train tokens/s ours/peer = X          target tokens (batch × target length) per second
  beam decode tokens/s ours/peer = X    new tokens of the best hypotheses (sources × 32)
  CPU MFU = X%      model FLOPs/s of our train step / the best 2048² matmul rate

Model FLOPs count matmuls as gpt_speed does (PaLM's appendix B): 6 per matmul parameter per
token it acts on (the encoder's and the cross-attention keys/values' on source tokens; the
decoder's other projections and the tied output projection on target tokens), plus 12·D
per (query, key) pair of each attention layer (encoder S², decoder self T², cross T·S;
the masked half of the causal one included).
"""

import argparse
import dataclasses
import statistics

import numpy as np

from bench import common

ADAMW = common.AdamW(learning_rate=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01,
                     clip_norm=1.0)
LABEL_SMOOTHING = 0.1
EOS, NUM_SPECIAL = 0, 1  # Marian's ids: EOS 0, pad (the decoder's start) the last id
PEERS = ('sdpa', 'eager')
NO_EOS = -1  # our eos_id while decoding: no token has it, so every beam runs to max_len


@dataclasses.dataclass(frozen=True)
class Shape:
  """The benchmarked model, batch and decoding, identical on both sides."""
  layers: int = 3  # encoder and decoder each
  width: int = 256
  heads: int = 4
  mlp: int = 1024
  vocab: int = 8000
  batch: int = 32
  source: int = 64
  target: int = 64
  beam: int = 4
  decode_batch: int = 8
  new_tokens: int = 32

  @property
  def pad(self) -> int:
    return self.vocab - 1

  @property
  def target_tokens_per_step(self) -> int:
    return self.batch * self.target

  def train_flops_per_step(self) -> float:
    d, f, layers = self.width, self.mlp, self.layers
    source_params = layers * (4 * d * d + 2 * d * f) + layers * 2 * d * d  # + cross k, v
    target_params = layers * (6 * d * d + 2 * d * f) + self.vocab * d  # + tied output
    matmuls = 6 * self.batch * (self.source * source_params + self.target * target_params)
    pairs = self.source**2 + self.target**2 + self.target * self.source
    return matmuls + 12 * d * layers * self.batch * pairs


def hf_config(shape: Shape) -> dict:
  """The config.json of the benchmarked MarianMTModel (the sides build their models from
  it: ours through `hf.marian.config_fields`)."""
  from hf import marian as hf_marian  # pylint: disable=g-import-not-at-top
  from models import encoder_decoder
  cfg = encoder_decoder.EncoderDecoderConfig(**hf_marian.config_fields(dict(
      model_type='marian', vocab_size=shape.vocab, d_model=shape.width,
      encoder_layers=shape.layers, decoder_layers=shape.layers,
      encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads,
      encoder_ffn_dim=shape.mlp, decoder_ffn_dim=shape.mlp,
      max_position_embeddings=max(shape.source, shape.target, shape.new_tokens),
      activation_function='relu', scale_embedding=True, dropout=0.0, attention_dropout=0.0)))
  return hf_marian.config_to_hf(cfg, bos_id=shape.pad, eos_id=EOS, pad_id=shape.pad)


def make_pairs(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
  """Source and target rows ending in EOS, and the decoder inputs (targets shifted right
  behind the start token, Marian's pad): int64 [B, S] / [B, T]."""
  rng = np.random.default_rng(seed)
  sources = rng.integers(NUM_SPECIAL, shape.pad, (shape.batch, shape.source))
  targets = rng.integers(NUM_SPECIAL, shape.pad, (shape.batch, shape.target))
  sources[:, -1] = targets[:, -1] = EOS
  decoder_inputs = np.concatenate([np.full((shape.batch, 1), shape.pad), targets[:, :-1]], 1)
  return {'sources': sources, 'targets': targets, 'decoder_inputs': decoder_inputs}


def marian_state(config: dict) -> dict[str, np.ndarray]:
  """A MarianMTModel's state dict with transformers' initialisation (seed 0), numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers
  torch.manual_seed(0)
  model = transformers.MarianMTModel(transformers.MarianConfig(**config))
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- our side


class Ours(common.JaxSide):
  """contextual's encoder-decoder, its seq2seq objective and real train step
  (training/step.py), and beam search (models/seq2seq_decoding.py)."""

  def __init__(self, setup: tuple[Shape, dict, dict[str, np.ndarray]]):
    import functools  # pylint: disable=g-import-not-at-top
    import jax
    import jax.numpy as jnp
    import objectives
    from hf import marian as hf_marian
    from models import encoder_decoder
    from models import seq2seq_decoding
    shape, config, state = setup
    self.shape = shape
    cfg = encoder_decoder.EncoderDecoderConfig(**hf_marian.config_fields(config))
    self.model = encoder_decoder.EncoderDecoder(cfg)
    params = hf_marian.params_from_hf(state, cfg)
    objective = objectives.build('seq2seq', {'label_smoothing': LABEL_SMOOTHING})
    batch = common.seq2seq_batch(**make_pairs(shape))
    self.init_train(self.model, params, objective.loss_fn, batch, ADAMW)
    self.sources = batch['inputs'][:shape.decode_batch]
    # Decoding uses the weights as imported (training moves them), a copy of their own
    # (the train step donates the state's buffers).
    self.params = jax.tree.map(jnp.array, params)
    self._decode_args = functools.partial(
        seq2seq_decoding.translate, self.model, beam_size=shape.beam, alpha=0.0,
        max_len=shape.new_tokens, bos_id=shape.pad, eos_id=NO_EOS, pad_id=shape.pad)
    self.best = None

  def warm_up(self) -> None:
    self.train(1)  # Compiles both, and warms the allocator.
    self.decode(1)

  def _decode_once(self) -> None:
    tokens_BRL, _ = self._decode_args(self.params, self.sources)
    self.best = np.asarray(tokens_BRL[:, 0])  # Waits for the search.

  def decode(self, repeats: int) -> list[float]:
    return common.timed(self._decode_once, repeats)

  def hypotheses(self, _) -> np.ndarray:
    return self.best


# -------------------------------------------------------------------------- the peer


class Peer(common.TorchSide):
  """transformers' MarianMTModel with label-smoothed cross-entropy, torch.optim.AdamW and
  `generate`, as their docs use them."""

  def __init__(self, setup: tuple[Shape, dict, dict[str, np.ndarray], str]):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers
    shape, config, state, attention = setup
    self.shape = shape
    config = transformers.MarianConfig(**config, attn_implementation=attention)
    model = transformers.MarianMTModel(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    self.init_train(model.train(), ADAMW, model.config._attn_implementation)
    # The frozen sinusoid tables are parameters in torch (requires_grad=False), not ours.
    self.num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pairs = make_pairs(shape)
    self.features = {'input_ids': torch.from_numpy(pairs['sources']),
                     'attention_mask': torch.ones(pairs['sources'].shape, dtype=torch.int64),
                     'decoder_input_ids': torch.from_numpy(pairs['decoder_inputs'])}
    self.labels = torch.from_numpy(pairs['targets'])
    self.sources = self.features['input_ids'][:shape.decode_batch]
    # Decoding uses the weights as imported (training moves them): a copy kept aside.
    self.decoder_model = transformers.MarianMTModel(config)
    self.decoder_model.load_state_dict(model.state_dict())
    self.decoder_model.eval()
    self.best = None

  def warm_up(self) -> None:
    self.train(1)  # Warms the allocator.
    self.decode(1)

  def step_loss(self):
    logits = self.model(**self.features, use_cache=False).logits
    return self._torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), self.labels.reshape(-1),
        label_smoothing=LABEL_SMOOTHING)

  def _decode_once(self) -> None:
    shape = self.shape
    out = self.decoder_model.generate(
        input_ids=self.sources, attention_mask=self._torch.ones_like(self.sources),
        num_beams=shape.beam, max_new_tokens=shape.new_tokens, do_sample=False,
        length_penalty=0.0, eos_token_id=None, forced_eos_token_id=None, use_cache=True)
    if out.shape[1] != shape.new_tokens + 1:
      raise RuntimeError(f'the peer decoded {out.shape[1] - 1} tokens, not {shape.new_tokens}')
    self.best = out[:, 1:].numpy()  # Without the start token.

  def decode(self, repeats: int) -> list[float]:
    with self._torch.inference_mode():
      return common.timed(self._decode_once, repeats)

  def hypotheses(self, _) -> np.ndarray:
    return self.best


# ---------------------------------------------------------------------------- driver


def run(shape: Shape, rounds: int, steps: int, decodes: int, matmul_repeats: int,
        peers: tuple[str, ...], env: dict[str, dict[str, str | None]]) -> dict:
  """Measures every side in rotating rounds; returns the medians and derived ratios."""
  config = hf_config(shape)
  state = marian_state(config)
  specs = {'ours': (Ours, (shape, config, state), env['ours'])}
  specs.update({p: (Peer, (shape, config, state, p), env['peer']) for p in peers})
  with common.started(specs) as sides:
    info = {name: side('describe') for name, side in sides.items()}
    common.check_same_params(info)
    samples = common.measure_rounds(
        sides, rounds, matmul_repeats,
        {'train': (steps, 'train s/step'), 'decode': (decodes, 'decode s')})
    losses = {name: side('loss') for name, side in sides.items()}
    best = {name: side('hypotheses') for name, side in sides.items()}
  common.check_first_losses(losses)
  return summarize(shape, samples, info, losses, best, peers=peers, env=env, rounds=rounds,
                   steps=steps, decodes=decodes)


def summarize(shape: Shape, samples: dict[tuple[str, str], list[float]], info: dict,
              losses: dict[str, float], best: dict[str, np.ndarray], *,
              peers: tuple[str, ...], env: dict[str, dict[str, str | None]], rounds: int,
              steps: int, decodes: int) -> dict:
  """The result of measured `samples` (`common.measure_rounds`'): medians, rates, ratios."""
  sides = ['ours', *peers]
  train_s = {n: statistics.median(samples[n, 'train']) for n in sides}
  decode_s = {n: statistics.median(samples[n, 'decode']) for n in sides}
  peak = max(max(samples[n, 'matmul']) for n in sides)
  train_peer = min(peers, key=train_s.get)
  decode_peer = min(peers, key=decode_s.get)
  tokens, new_tokens = shape.target_tokens_per_step, shape.decode_batch * shape.new_tokens
  train_gflops = {n: shape.train_flops_per_step() / train_s[n] / 1e9 for n in sides}
  return {
      'shape': dataclasses.asdict(shape), 'rounds': rounds, 'steps': steps,
      'decodes': decodes, 'label_smoothing': LABEL_SMOOTHING,
      'adamw': dataclasses.asdict(ADAMW),
      'glibc_tunables': {'ours': env['ours'].get('GLIBC_TUNABLES'),
                         'peer': env['peer'].get('GLIBC_TUNABLES')},
      'frameworks': {n: info[n]['framework'] for n in sides},
      'params': info['ours']['params'], 'first_loss': losses,
      'same_best_hypotheses': {p: float(np.mean(np.all(best[p] == best['ours'], axis=1)))
                               for p in peers},
      'train_s_per_step': train_s, 'decode_s_per_batch': decode_s,
      'train_tokens_per_s': {n: tokens / train_s[n] for n in sides},
      'decode_tokens_per_s': {n: new_tokens / decode_s[n] for n in sides},
      'train_peer': train_peer, 'decode_peer': decode_peer,
      'train_ratio': train_s[train_peer] / train_s['ours'],
      'decode_ratio': decode_s[decode_peer] / decode_s['ours'],
      'train_model_gflops_per_s': train_gflops,
      'matmul_gflops_per_s': {n: max(samples[n, 'matmul']) for n in sides},
      'train_mfu': {n: train_gflops[n] / peak for n in sides},
  }


def report(result: dict, command: str, note: str = '') -> str:
  """The markdown page: what ran where, a table, and the three headline lines."""
  s, names = result['shape'], list(result['frameworks'])
  titles = {'ours': 'ours (JAX)', **{p: f'peer {p} (PyTorch)' for p in PEERS}}

  def row(label, values, fmt, ratio='', unit=''):
    return common.table_row(label, values, names, fmt, ratio, unit)

  mfu = {n: 100 * v for n, v in result['train_mfu'].items()}
  same = ', '.join(f'{p} {100 * v:.0f}%' for p, v in result['same_best_hypotheses'].items())
  lines = [
      *common.page_head('Seq2seq speed: contextual vs Hugging Face transformers (PyTorch)',
                        command, note, result),
      (f'Model: the Transformer as Marian has it (post-LN, ReLU, sinusoids, shared tied '
       f'embeddings × sqrt(D)), {s["layers"]} + {s["layers"]} layers, width {s["width"]}, '
       f'{s["heads"]} heads, MLP {s["mlp"]}, vocabulary {s["vocab"]}, '
       f'{result["params"]:,} parameters on every side, the same weights (transformers\' '
       f'init, seed 0). Train: batch {s["batch"]} pairs of {s["source"]} source x '
       f'{s["target"]} target tokens, float32, no dropout, label smoothing '
       f'{result["label_smoothing"]}, AdamW + clipping; tokens/s counts target tokens. '
       f'Beam search: beam {s["beam"]}, {s["decode_batch"]} sources, exactly '
       f'{s["new_tokens"]} new tokens each (EOS disabled on both sides), length penalty 0; '
       f'tokens/s counts the new tokens of the best hypotheses. Medians over '
       f'{result["rounds"]} rotating rounds of {result["steps"]} train steps and '
       f'{result["decodes"]} beam searches. First losses: '
       + ', '.join(f'{n} {v:.4f}' for n, v in result['first_loss'].items())
       + f'. Same best hypotheses as ours: {same} of the sources.'), '',
      f'Ratios are against the faster peer on each measure: train {result["train_peer"]}, '
      f'beam decode {result["decode_peer"]}.', '',
      '| measure | ' + ' | '.join(titles[n] for n in names) + ' | ours/peer |',
      '|---|' + '---|' * (len(names) + 1),
      row('train step (s)', result['train_s_per_step'], '.3f'),
      row('train target tokens/s', result['train_tokens_per_s'], '.0f',
          f'{result["train_ratio"]:.2f}'),
      row('train model GFLOP/s', result['train_model_gflops_per_s'], '.1f'),
      row('train MFU (vs the best matmul)', mfu, '.1f', unit='%'),
      row('beam search (s)', result['decode_s_per_batch'], '.3f'),
      row('beam decode tokens/s', result['decode_tokens_per_s'], '.0f',
          f'{result["decode_ratio"]:.2f}'),
      row('2048² matmul GFLOP/s (best)', result['matmul_gflops_per_s'], '.1f'),
      *common.page_tail(result, headline(result))]
  return '\n'.join(lines)


def headline(result: dict) -> list[str]:
  return [f'train tokens/s ours/peer = {result["train_ratio"]:.2f}',
          f'beam decode tokens/s ours/peer = {result["decode_ratio"]:.2f}',
          f'CPU MFU = {100 * result["train_mfu"]["ours"]:.1f}%']


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  common.add_run_arguments(
      parser, Shape, 'seq2seq_speed', peers=PEERS,
      per_round=[('decodes', 3, 'beam searches timed per round')])
  args = parser.parse_args(argv)
  shape = common.shape_from_args(args, Shape)
  if shape.decode_batch > shape.batch:
    parser.error('--decode_batch cannot exceed --batch (it takes the first sources)')
  if shape.new_tokens > max(shape.source, shape.target):
    parser.error('--new_tokens cannot exceed the longest side (the position table)')
  peers = common.peers_from_args(parser, args, PEERS)
  env = dict(zip(('ours', 'peer'), common.tunables_env(args.peer_tunables)))
  result = run(shape, args.rounds, args.steps, args.decodes, args.matmul_repeats, peers, env)
  common.write_page('seq2seq_speed', argv, args, result, report, headline)


if __name__ == '__main__':
  main()
