"""Our ELECTRA pretraining step against Hugging Face's PyTorch ELECTRA on this machine.

  .venv/bin/python -m bench.electra_speed          # or: make bench BENCH=electra_speed
  .venv/bin/python -m bench.electra_speed --rounds=2 --steps=2    # quick look

Both sides build the same ELECTRA (configs/electra.py's recipe at a small size):
a discriminator, a BERT encoder (post-LN, exact GELU, learned positions, token types; by
default 4 layers, width 256, 4 heads, MLP 1024, vocabulary 8192) with its RTD head (dense,
GELU, dense to one logit); a generator at 1/4 of its width (64 wide, 1 head of 64, MLP 256,
as deep) with its MLM head tied to the token embeddings; one embedding module of width 256
shared by both (the generator projects it to 64 and its MLM head back to 256). One step:

- 16 rows of 128 tokens, bench/bert_speed.py's sentence pairs `[CLS] A [SEP] B [SEP]`
  (no NSP). Per row 15% of the non-special tokens are selected, 85% [MASK] / 15% kept.
- The generator's MLM loss at the selected positions; replacements sampled (temperature 1,
  no gradient) from its logits at those positions; the discriminator's RTD loss over every
  token of the replaced input; loss = MLM + 50·RTD; backward through both models; BERT's
  AdamW (bert_speed's: 0.9/0.999, eps 1e-6, weight decay 0.01 on matrices) after
  global-norm clipping at 1. Float32, no dropout.

Ours is models/electra.py's `Electra` with `objectives.build('electra')` through
training/step.py's `train_step`; masks and samples (inverse CDF over the softmax) are
drawn on device inside the step, and the generator's MLM head runs only at the slots the
masking can select (⌊0.15·T⌋ + 1 per row, objectives/electra.py), as Google's ELECTRA code
runs it at its max_predictions_per_seq. The peer is `ElectraForMaskedLM` (the generator)
and `ElectraForPreTraining` (the discriminator), the generator's embedding module replaced
by the discriminator's and its tied output layer re-tied to the shared token table, as
ELECTRA's pretraining shares them. Its masks are drawn once beforehand (a data collator's
work, left out of its step, as in bert_speed); its samples are drawn in the step with
`torch.multinomial` over the softmax at the selected positions.

Peer sides, each in its own worker: 'sdpa' and 'eager' (the attention implementation) run
`ElectraForMaskedLM`'s own forward, whose MLM head scores every position, as its users
train it; 'sdpa_gathered' runs the same modules with the MLM head applied only to the
selected positions' hidden states (the computation ours does). The ratio is against the
fastest peer side. Parameter counts are checked equal, ours less its two poolers:
models/bert.py's BERT always builds one (D² + D parameters), ELECTRA's loss never reads it
(XLA drops its work; its gradient is zero) and HF's ElectraModel has none. Workers, turns
and environments as in bench/bert_speed.py (bench/common.py): every side measures in turn,
the first rotating each round, and medians are reported.
Printed (and written to docs/electra_speed.md):

  train tokens/s ours/peer = X
  CPU MFU = X%      model FLOPs/s of our train step / the best 2048² matmul rate

Model FLOPs count matmuls as bert_speed does (PaLM's appendix B), for both models, forward
and backward: 6 per matmul parameter per token (the discriminator's encoder and RTD head;
the generator's projection from the shared embeddings, encoder, MLM dense and tied output
projection) plus 12·L·T·D for attention in each encoder (at its own width D); the MLM
head's terms count the positions each side scores (all T, or the gathered ones). Sampling,
embedding lookups, norms and the optimizer are not counted.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import types

from bench import bert_speed
from bench import common

MASK_RATE, MASK_FRACTION, RANDOM_FRACTION = 0.15, 0.85, 0.0  # ELECTRA's masking
RTD_WEIGHT, TEMPERATURE = 50.0, 1.0
PEERS = (*bert_speed.PEERS, 'sdpa_gathered')  # HF's forward (all positions), or gathered


@dataclasses.dataclass(frozen=True)
class Shape:
  """The benchmarked model and batch, identical on both sides: the discriminator's sizes
  and the generator's fraction of its width."""
  layers: int = 4
  width: int = 256
  heads: int = 4
  mlp: int = 1024
  vocab: int = 8192
  seq: int = 128
  batch: int = 16
  generator: float = 0.25

  @property
  def tokens_per_step(self) -> int:
    return self.batch * self.seq


def electra_config(shape: Shape, dropout: float):
  from models import electra  # pylint: disable=g-import-not-at-top
  return electra.ElectraConfig(vocab_size=shape.vocab, max_len=shape.seq,
                               num_layers=shape.layers, num_heads=shape.heads,
                               embed_dim=shape.width, mlp_dim=shape.mlp, dropout_rate=dropout,
                               generator_fraction=shape.generator)


def train_flops_per_token(cfg, head_fraction: float = 1.0) -> float:
  """6 per matmul parameter of both models (see the module's docstring) plus attention's
  two matmuls over the full T x T in each encoder; the generator's MLM head runs at
  `head_fraction` of the positions."""
  width_e = cfg.embedding_width
  total = 0
  for encoder in (cfg.discriminator, cfg.generator):
    d = encoder.embed_dim
    total += 6 * encoder.num_layers * (4 * d**2 + 2 * d * encoder.mlp_dim)
    total += 6 * width_e * d if width_e != d else 0  # projection from the shared embeddings
    total += 12 * encoder.num_layers * cfg.max_len * d  # max_len: the rows are T long
  d, g = cfg.embed_dim, cfg.generator.embed_dim
  total += 6 * (d**2 + d)  # the RTD head: dense, then one logit
  total += 6 * head_fraction * (g * width_e + cfg.vocab_size * width_e)  # MLM dense, tied output
  return total


def hf_config(cfg) -> dict:
  """transformers' ElectraConfig fields of one of our encoders (a BertConfig that reads
  embeddings of width `embedding_size`): hf.bert's map, with ELECTRA's embedding size."""
  from hf import bert as hf_bert  # pylint: disable=g-import-not-at-top
  fields = hf_bert.config_to_hf(dataclasses.replace(cfg, embedding_size=0, mlm_head=True))
  return {**{k: v for k, v in fields.items() if k not in ('architectures', 'model_type')},
          'embedding_size': cfg.embedding_width}


# --------------------------------------------------------------------------- our side


class Ours(common.JaxSide):
  """contextual's ELECTRA, its objective and real train step (training/step.py)."""

  def __init__(self, setup: tuple[Shape, float]):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax
    import objectives
    from models import electra
    from objectives import electra as objective_lib
    shape, dropout = setup
    model = electra.Electra(electra_config(shape, dropout))
    tokenizer = types.SimpleNamespace(mask_id=bert_speed.MASK, vocab_size=shape.vocab,
                                      special_ids=bert_speed.SPECIAL_IDS)
    objective = objectives.build(
        'electra', {'rate': MASK_RATE, 'mask_fraction': MASK_FRACTION,
                    'random_fraction': RANDOM_FRACTION, 'rtd_weight': RTD_WEIGHT,
                    'temperature': TEMPERATURE}, tokenizer=tokenizer)
    pairs = bert_speed.make_pairs(shape)
    batch = common.encoder_batch(pairs['tokens'], pairs['token_types'])
    params = nn.unbox(model.init(jax.random.key(0), batch['inputs'])['params'])
    self.init_train(model, params, objective.loss_fn, batch, bert_speed.ADAMW)
    # BERT's poolers, unused by ELECTRA's loss and absent from HF's ELECTRA: not compared.
    self.poolers = sum(p.size for part in ('generator', 'discriminator')
                       for p in jax.tree.leaves(params[part]['pooler']))
    self.num_params -= self.poolers
    # The positions its generator's MLM head scores (objectives/electra.py).
    self.head_fraction = objective_lib.prediction_slots(
        objective.settings.masking, shape.seq, static=False) / shape.seq

  def describe(self, _) -> dict:
    return {**super().describe(_), 'poolers': self.poolers,
            'head_fraction': self.head_fraction}

  def warm_up(self) -> None:
    self.train(1)  # Compiles, and warms the allocator.


# -------------------------------------------------------------------------- the peer


class Peer(common.TorchSide):
  """transformers' ElectraForMaskedLM and ElectraForPreTraining over one embedding module,
  with torch.optim.AdamW."""

  def __init__(self, setup: tuple[Shape, float, str]):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers
    shape, dropout, side = setup
    attention, _, gathered = side.partition('_')
    self.gathered = bool(gathered)
    torch.manual_seed(0)
    cfg = electra_config(shape, dropout)
    generator = transformers.ElectraForMaskedLM(transformers.ElectraConfig(
        **hf_config(cfg.generator), attn_implementation=attention))
    discriminator = transformers.ElectraForPreTraining(transformers.ElectraConfig(
        **hf_config(cfg.discriminator), attn_implementation=attention))
    shared = discriminator.electra.embeddings
    generator.electra.embeddings = shared
    # The output layer was tied to the generator's own table, now gone: tie it to the shared.
    generator.generator_lm_head.weight = shared.word_embeddings.weight
    model = torch.nn.ModuleDict({'generator': generator, 'discriminator': discriminator})
    self.init_train(model.train(), bert_speed.ADAMW, discriminator.config._attn_implementation)
    pairs = bert_speed.make_pairs(shape)
    inputs, labels = common.peer_masks(
        pairs['tokens'], shape.vocab, special_ids=bert_speed.SPECIAL_IDS,
        mask_id=bert_speed.MASK, rate=MASK_RATE, mask_fraction=MASK_FRACTION,
        random_fraction=RANDOM_FRACTION)
    self.features = {'token_type_ids': torch.from_numpy(pairs['token_types']),
                     'attention_mask': torch.ones(inputs.shape, dtype=torch.int64)}
    self.inputs, self.labels = torch.from_numpy(inputs), torch.from_numpy(labels)
    self.originals = torch.from_numpy(pairs['tokens'])
    self.selected = self.labels != -100

  def warm_up(self) -> None:
    self.train(1)  # Warms the allocator.

  def describe(self, _) -> dict:
    description = super().describe(_)
    if self.gathered:
      description['framework'] += ', MLM head at the selected positions'
    scored = int(self.selected.sum()) if self.gathered else self.selected.numel()
    return {**description, 'head_fraction': scored / self.selected.numel()}

  def generator_logits(self):
    """(the generator's MLM loss, its logits at the selected positions [M, V])."""
    torch, generator = self._torch, self.model['generator']
    if not self.gathered:  # ElectraForMaskedLM's own forward: every position.
      generated = generator(input_ids=self.inputs, labels=self.labels, **self.features)
      return generated.loss, generated.logits[self.selected]
    hidden = generator.electra(input_ids=self.inputs, **self.features).last_hidden_state
    logits_MV = generator.generator_lm_head(generator.generator_predictions(
        hidden[self.selected]))
    return torch.nn.functional.cross_entropy(logits_MV, self.labels[self.selected]), logits_MV

  def step_loss(self):
    torch = self._torch
    mlm_loss, logits_MV = self.generator_logits()
    with torch.no_grad():
      probs_MV = torch.softmax(logits_MV / TEMPERATURE, dim=-1)
      replaced = self.originals.clone()
      replaced[self.selected] = torch.multinomial(probs_MV, 1)[:, 0]
    discriminated = self.model['discriminator'](
        input_ids=replaced, labels=(replaced != self.originals).long(), **self.features)
    return mlm_loss + RTD_WEIGHT * discriminated.loss


# ---------------------------------------------------------------------------- driver


def run(shape: Shape, rounds: int, steps: int, matmul_repeats: int, dropout: float,
        peers: tuple[str, ...], env: dict[str, dict[str, str | None]]) -> dict:
  """Measures every side in rotating rounds; returns the medians and derived ratios."""
  specs = {'ours': (Ours, (shape, dropout), env['ours'])}
  specs.update({p: (Peer, (shape, dropout, p), env['peer']) for p in peers})
  with common.started(specs) as sides:
    info = {name: side('describe') for name, side in sides.items()}
    if len({i['params'] for i in info.values()}) != 1:
      raise RuntimeError(f'the models differ: {info}')
    samples = {(name, what): [] for name in sides for what in ('matmul', 'train')}
    for r in range(rounds):
      for name in common.round_order(list(sides), r):
        samples[name, 'matmul'].append(sides[name]('matmul', matmul_repeats))
        samples[name, 'train'].extend(sides[name]('train', steps))
      print(f'round {r + 1}/{rounds}: train s/step ' + ', '.join(
          f'{n} {statistics.median(samples[n, "train"]):.3f}' for n in sides), flush=True)
    losses = {name: side('loss') for name, side in sides.items()}

  train_s = {n: statistics.median(samples[n, 'train']) for n in sides}
  peak = max(max(samples[n, 'matmul']) for n in sides)
  train_peer = min(peers, key=train_s.get)
  tokens = shape.tokens_per_step
  cfg = electra_config(shape, dropout)
  flops_per_token = {n: train_flops_per_token(cfg, info[n]['head_fraction']) for n in sides}
  train_gflops = {n: flops_per_token[n] * tokens / train_s[n] / 1e9 for n in sides}
  return {
      'shape': dataclasses.asdict(shape), 'dropout': dropout, 'rounds': rounds,
      'steps': steps,
      'glibc_tunables': {'ours': env['ours'].get('GLIBC_TUNABLES'),
                         'peer': env['peer'].get('GLIBC_TUNABLES')},
      'frameworks': {n: info[n]['framework'] for n in sides},
      'params': info['ours']['params'], 'our_poolers': info['ours']['poolers'],
      'train_flops_per_token': flops_per_token, 'first_loss': losses,
      'train_s_per_step': train_s,
      'train_tokens_per_s': {n: tokens / train_s[n] for n in sides},
      'train_peer': train_peer,
      'train_ratio': train_s[train_peer] / train_s['ours'],
      'train_model_gflops_per_s': train_gflops,
      'matmul_gflops_per_s': {n: max(samples[n, 'matmul']) for n in sides},
      'train_mfu': {n: train_gflops[n] / peak for n in train_gflops},
      'head_fraction': {n: info[n]['head_fraction'] for n in sides},
  }


def report(result: dict, command: str) -> str:
  """The markdown page: what ran where, a table, and the two headline lines."""
  s, names = result['shape'], list(result['frameworks'])
  titles = {'ours': 'ours (JAX)', **{p: f'peer {p} (PyTorch)' for p in PEERS}}
  row = lambda label, values, fmt, ratio='', unit='': common.table_row(
      label, values, names, fmt, ratio, unit)
  cfg = electra_config(Shape(**s), result['dropout'])
  g = cfg.generator
  lines = [
      '# ELECTRA speed: contextual vs Hugging Face transformers (PyTorch)', '',
      f'Command: `{command}`', '',
      common.machine_line(), '',
      'Sides: ' + '; '.join(f'{n}: {f}' for n, f in result['frameworks'].items()) + '.', '',
      (f'GLIBC_TUNABLES: ours {result["glibc_tunables"]["ours"] or "unset"}; peer '
       f'{result["glibc_tunables"]["peer"] or "unset"}.'), '',
      (f'Model: ELECTRA, discriminator {s["layers"]} layers, width {s["width"]}, '
       f'{s["heads"]} heads, MLP {s["mlp"]}; generator ({s["generator"]} of its width) '
       f'{g.num_layers} layers, width {g.embed_dim}, {g.num_heads} heads, MLP {g.mlp_dim}; '
       f'shared embeddings of width {cfg.embedding_width}, vocabulary {s["vocab"]}; '
       f'{result["params"]:,} parameters on every side (ours also holds '
       f'{result["our_poolers"]:,} in two unused poolers, not counted). Batch {s["batch"]} x '
       f'{s["seq"]} tokens, float32, dropout {result["dropout"]}, MLM (15% selected, 85% '
       f'[MASK]) + {RTD_WEIGHT:g} x RTD, AdamW + clipping. '
       'Model MFLOP per token (the MLM head at the positions each side scores): '
       + ', '.join(f'{n} {v / 1e6:.1f}' for n, v in result['train_flops_per_token'].items())
       + f'. Medians over '
       f'{result["rounds"]} rotating rounds of {result["steps"]} train steps. First losses: '
       + ', '.join(f'{n} {v:.4f}' for n, v in result['first_loss'].items()) + '.'), '',
      f'The ratio is against the faster peer: {result["train_peer"]}.', '',
      '| measure | ' + ' | '.join(titles[n] for n in names) + ' | ours/peer |',
      '|---|' + '---|' * (len(names) + 1),
      row('train step (s)', result['train_s_per_step'], '.3f'),
      row('train tokens/s', result['train_tokens_per_s'], '.0f', f'{result["train_ratio"]:.2f}'),
      row('train model GFLOP/s', result['train_model_gflops_per_s'], '.1f'),
      row('train MFU (vs the best matmul)',
          {n: 100 * v for n, v in result['train_mfu'].items()}, '.1f', unit='%'),
      row('MLM head: fraction of positions scored', result['head_fraction'], '.3f'),
      row('2048² matmul GFLOP/s (best)', result['matmul_gflops_per_s'], '.1f'), '',
      'MFU percentages are of the best 2048² matmul rate of any side in this run.', '',
      '```', *headline(result), '```', '',
      '```json', json.dumps(result, indent=1), '```', '']
  return '\n'.join(lines)


def headline(result: dict) -> list[str]:
  return [f'train tokens/s ours/peer = {result["train_ratio"]:.2f}',
          f'CPU MFU = {100 * result["train_mfu"]["ours"]:.1f}%']


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for field in dataclasses.fields(Shape):
    parser.add_argument(f'--{field.name}', type=field.type, default=field.default)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='train steps timed per round')
  parser.add_argument('--matmul_repeats', type=int, default=5)
  parser.add_argument('--dropout', type=float, default=0.0, help='on both sides')
  parser.add_argument('--peers', default=','.join(PEERS),
                      help="the peer's sides (attention implementation, _gathered: the MLM "
                           'head at the selected positions only), each in its own worker')
  parser.add_argument('--out', default=f'{common.DOCS}/electra_speed.md')
  parser.add_argument('--peer_tunables', choices=('default', 'ours'), default='default',
                      help="the peer's glibc malloc settings (see bench/gpt_speed.py)")
  args = parser.parse_args(argv)
  shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
  peers = tuple(args.peers.split(','))
  if not set(peers) <= set(PEERS) or not peers:
    parser.error(f'--peers must name some of {PEERS}')
  env = dict(zip(('ours', 'peer'), common.tunables_env(args.peer_tunables)))
  result = run(shape, args.rounds, args.steps, args.matmul_repeats, args.dropout, peers, env)
  command = 'python -m bench.electra_speed ' + ' '.join(sys.argv[1:] if argv is None else argv)
  page = report(result, command.strip())
  with open(args.out, 'w') as f:
    f.write(page)
  print('\n'.join(headline(result)))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
