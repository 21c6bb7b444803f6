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
drawn on device inside the step. The peer is `ElectraForMaskedLM` (the generator) and
`ElectraForPreTraining` (the discriminator), the generator's embedding module replaced
by the discriminator's and its tied output layer re-tied to the shared token table, as
ELECTRA's pretraining shares them.
Its masks are drawn once beforehand (a data collator's work, left out of its step, as in
bert_speed); its samples are drawn in the step with `torch.multinomial` over the softmax
at the selected positions. Both compute the generator's logits at every position, as both
models do.

The peer runs with attention 'sdpa' and 'eager', each in its own worker; the ratio is
against the faster. A fourth side (`--no-gathered` drops it), `ours_gathered`, times a
what-if: our step with the generator's MLM head, and so the sampling, run only at the
selected positions (`gathered_loss_fn`, as Google's ELECTRA code does), which
models/electra.py does not do. Parameter counts are checked equal, ours less its two poolers:
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
projection) plus 12·L·T·D for attention in each encoder (at its own width D). Sampling,
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
GATHERED = 'ours_gathered'  # the side that runs the generator's MLM head at selected positions


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


def train_flops_per_token(cfg) -> float:
  """6 per matmul parameter of both models (see the module's docstring) plus attention's
  two matmuls over the full T x T in each encoder."""
  width_e = cfg.embedding_width
  total = 0
  for encoder in (cfg.discriminator, cfg.generator):
    d = encoder.embed_dim
    total += 6 * encoder.num_layers * (4 * d**2 + 2 * d * encoder.mlp_dim)
    total += 6 * width_e * d if width_e != d else 0  # projection from the shared embeddings
    total += 12 * encoder.num_layers * cfg.max_len * d  # max_len: the rows are T long
  d, g = cfg.embed_dim, cfg.generator.embed_dim
  total += 6 * (d**2 + d)  # the RTD head: dense, then one logit
  total += 6 * (g * width_e + cfg.vocab_size * width_e)  # MLM dense, tied output
  return total


def hf_config(cfg) -> dict:
  """transformers' ElectraConfig fields of one of our encoders (a BertConfig that reads
  embeddings of width `embedding_size`): hf.bert's map, with ELECTRA's embedding size."""
  from hf import bert as hf_bert  # pylint: disable=g-import-not-at-top
  fields = hf_bert.config_to_hf(dataclasses.replace(cfg, embedding_size=0, mlm_head=True))
  return {**{k: v for k, v in fields.items() if k not in ('architectures', 'model_type')},
          'embedding_size': cfg.embedding_width}


# --------------------------------------------------------------------------- our side


def gathered_loss_fn(params, batch, rng, *, model, deterministic: bool = False, settings,
                     max_predictions: int):
  """objectives/electra.py's loss_fn with the generator's MLM head, and so the sampling,
  run only at the selected positions: the first `max_predictions` per row, gathered before
  the head, as Google's ELECTRA code does (its max_predictions_per_seq). A what-if for
  docs/benchmarks.md (models/electra.py scores all T positions); the generator's own
  [B, T, V] logits go unused, so XLA drops them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from objectives import electra
  from objectives import masked_lm
  inputs_BT, targets_BT, weights_BT = masked_lm.masked_inputs(batch, rng, settings.masking)
  selected_BT = weights_BT > 0
  originals_BT = jnp.where(selected_BT, targets_BT, inputs_BT)
  features = dict(token_types_BT=batch.get('token_types'), segment_ids_BT=batch['segment_ids'],
                  positions_BT=batch['positions'], deterministic=deterministic)
  variables = {'params': params}
  generated = model.apply(variables, inputs_BT, **features, method='generate',
                          rngs={'dropout': masked_lm.dropout_rng(rng)})
  index_BM, take = common.labelled_positions(weights_BT, max_predictions)
  logits_BMV = common.mlm_head_at(params['generator'],
                                  params['embeddings']['token_embed']['embedding'],
                                  take(generated['hidden']), model.config.generator)
  sums = masked_lm.mlm_sums(logits_BMV, take(targets_BT), take(weights_BT))
  # The objective's RNG streams, so the discriminator's dropout matches loss_fn's.
  replaced_BM, _ = electra.replace_tokens(
      jax.random.fold_in(rng, electra._SAMPLE_STREAM), logits_BMV, take(originals_BT),
      take(selected_BT), settings.temperature)
  rows_B1 = jnp.arange(index_BM.shape[0])[:, None]
  replaced_inputs_BT = originals_BT.at[rows_B1, index_BM].set(replaced_BM)
  discriminated = model.apply(
      variables, replaced_inputs_BT, **features, method='discriminate',
      rngs={'dropout': jax.random.fold_in(rng, electra._DISCRIMINATOR_DROPOUT_STREAM)})
  real_BT = (batch['segment_ids'] != 0).astype(jnp.float32)
  sums.update(electra.rtd_sums(discriminated['rtd_logits'], replaced_inputs_BT != originals_BT,
                               real_BT))
  sums['weight'] = sums['rtd_weight']
  mlm_loss = sums['mlm_loss_sum'] / jnp.maximum(sums['mlm_weight'], 1.0)
  rtd_loss = sums['rtd_loss_sum'] / jnp.maximum(sums['rtd_weight'], 1.0)
  return mlm_loss + settings.rtd_weight * rtd_loss, sums


class Ours(common.JaxSide):
  """contextual's ELECTRA, its objective and real train step (training/step.py)."""

  def __init__(self, setup: tuple[Shape, float, bool]):
    import functools  # pylint: disable=g-import-not-at-top
    import flax.linen as nn
    import jax
    import numpy as np
    import objectives
    from models import electra
    shape, dropout, gathered = setup
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
    loss_fn = objective.loss_fn
    if gathered:  # The same MLM loss (checked here); samples are drawn from other numbers.
      loss_fn = functools.partial(gathered_loss_fn, settings=objective.settings,
                                  max_predictions=int(MASK_RATE * shape.seq) + 1)
      full, part = (jax.jit(functools.partial(f, model=model))(
          params, batch, jax.random.key(0))[1] for f in (objective.loss_fn, loss_fn))
      for name in ('mlm_loss_sum', 'mlm_weight', 'rtd_weight'):
        np.testing.assert_allclose(part[name], full[name], rtol=1e-5, err_msg=name)
    self.init_train(model, params, loss_fn, batch, bert_speed.ADAMW)
    # BERT's poolers, unused by ELECTRA's loss and absent from HF's ELECTRA: not compared.
    self.poolers = sum(p.size for part in ('generator', 'discriminator')
                       for p in jax.tree.leaves(params[part]['pooler']))
    self.num_params -= self.poolers

  def describe(self, _) -> dict:
    return {**super().describe(_), 'poolers': self.poolers}

  def warm_up(self) -> None:
    self.train(1)  # Compiles, and warms the allocator.


# -------------------------------------------------------------------------- the peer


class Peer(common.TorchSide):
  """transformers' ElectraForMaskedLM and ElectraForPreTraining over one embedding module,
  with torch.optim.AdamW."""

  def __init__(self, setup: tuple[Shape, float, str]):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers
    shape, dropout, attention = setup
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

  def step_loss(self):
    torch = self._torch
    generated = self.model['generator'](input_ids=self.inputs, labels=self.labels,
                                        **self.features)
    with torch.no_grad():
      probs_MV = torch.softmax(generated.logits[self.selected] / TEMPERATURE, dim=-1)
      replaced = self.originals.clone()
      replaced[self.selected] = torch.multinomial(probs_MV, 1)[:, 0]
    discriminated = self.model['discriminator'](
        input_ids=replaced, labels=(replaced != self.originals).long(), **self.features)
    return generated.loss + RTD_WEIGHT * discriminated.loss


# ---------------------------------------------------------------------------- driver


def run(shape: Shape, rounds: int, steps: int, matmul_repeats: int, dropout: float,
        peers: tuple[str, ...], gathered: bool, env: dict[str, dict[str, str | None]]) -> dict:
  """Measures every side in rotating rounds; returns the medians and derived ratios."""
  specs = {'ours': (Ours, (shape, dropout, False), env['ours'])}
  if gathered:
    specs[GATHERED] = (Ours, (shape, dropout, True), env['ours'])
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
  flops_per_token = train_flops_per_token(electra_config(shape, dropout))
  # Model FLOPs are those of the model as it is (all positions scored): not the what-if's.
  train_gflops = {n: flops_per_token * tokens / train_s[n] / 1e9
                  for n in sides if n != GATHERED}
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
      # The what-if: the generator's MLM head at selected positions only (`gathered_loss_fn`).
      **({'gathered_train_ratio': train_s[train_peer] / train_s[GATHERED],
          'gathered_speedup': train_s['ours'] / train_s[GATHERED]} if GATHERED in sides else {}),
  }


def report(result: dict, command: str) -> str:
  """The markdown page: what ran where, a table, and the two headline lines."""
  s, names = result['shape'], list(result['frameworks'])
  titles = {'ours': 'ours (JAX)',
            GATHERED: "ours, generator's MLM head at selected positions only (JAX)",
            **{p: f'peer {p} (PyTorch)' for p in bert_speed.PEERS}}
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
       f'{result["train_flops_per_token"] / 1e6:.1f} model MFLOP per token. Medians over '
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
      row('2048² matmul GFLOP/s (best)', result['matmul_gflops_per_s'], '.1f'), '',
      'MFU percentages are of the best 2048² matmul rate of any side in this run.', '',
      *([f"What-if, the generator's MLM head and sampling at selected positions only "
         f'({GATHERED}, not what models/electra.py does): train tokens/s '
         f'{result["gathered_train_ratio"]:.2f}x the faster peer, '
         f'{result["gathered_speedup"]:.2f}x ours as it is.', '']
        if 'gathered_speedup' in result else []),
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
  parser.add_argument('--peers', default=','.join(bert_speed.PEERS),
                      help="the peer's attention implementations, each a side of its own")
  parser.add_argument('--gathered', action=argparse.BooleanOptionalAction, default=True,
                      help="also time ours with the generator's MLM head at selected "
                           'positions only')
  parser.add_argument('--out', default=f'{common.DOCS}/electra_speed.md')
  parser.add_argument('--peer_tunables', choices=('default', 'ours'), default='default',
                      help="the peer's glibc malloc settings (see bench/gpt_speed.py)")
  args = parser.parse_args(argv)
  shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
  peers = tuple(args.peers.split(','))
  if not set(peers) <= set(bert_speed.PEERS) or not peers:
    parser.error(f'--peers must name some of {bert_speed.PEERS}')
  env = dict(zip(('ours', 'peer'), common.tunables_env(args.peer_tunables)))
  result = run(shape, args.rounds, args.steps, args.matmul_repeats, args.dropout, peers,
               args.gathered, env)
  command = 'python -m bench.electra_speed ' + ' '.join(sys.argv[1:] if argv is None else argv)
  page = report(result, command.strip())
  with open(args.out, 'w') as f:
    f.write(page)
  print('\n'.join(headline(result)))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
