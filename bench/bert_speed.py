"""Our BERT against Hugging Face's PyTorch BERT on this machine: pretraining, encoding, MFU.

  .venv/bin/python -m bench.bert_speed             # or: make bench BENCH=bert_speed
  .venv/bin/python -m bench.bert_speed --rounds=2 --steps=2    # quick look

Both sides build the same BERT (post-LN, exact GELU, learned positions, token types, pooler,
tied MLM head with its output bias, NSP head; by default 4 layers, width 512, 8 heads, MLP
2048, vocabulary 8192; the peer's config is ours through hf.bert.config_to_hf) and run:

- a pretraining step (MLM + NSP) on 16 sentence pairs `[CLS] A [SEP] B [SEP]` of 128
  tokens, float32, AdamW (BERT's: betas 0.9/0.999, eps 1e-6, weight decay 0.01 on matrices)
  with global-norm clipping at 1, no dropout. 15% of the non-special tokens of a row are
  labelled, 80% [MASK] / 10% random / 10% kept. Ours is models/bert.py's `BERT` with
  objectives/bert_pretraining.py through training/step.py's `train_step`, masks drawn on
  device inside the step (the trainer's dynamic masking); the peer is
  `BertForPreTraining` with `labels` (-100 where not labelled) and `next_sentence_label`,
  masks drawn once beforehand (a data collator's work, outside its step). Both compute MLM
  logits at every position, as both models do.
- encoding, the feature-extraction path: the last hidden states of the same batch, forward
  only. Ours: the model under jax.jit returning 'hidden' (XLA drops the unused heads); the
  peer: `BertForPreTraining.bert` (a `BertModel`) in eval mode under inference_mode.

The peer runs twice, with attention 'sdpa' and 'eager', each in its own worker; each ratio
is against the faster of the two on that measure (both are in the table). A fourth side
(`--no-gathered` drops it), `ours_gathered`, times a what-if: our step with the MLM head run
only at the labelled positions (`gathered_loss_fn`), which models/bert.py does not do.
Parameter counts are checked equal. Workers, turns and environments as in
bench/gpt_speed.py (bench/common.py): every side measures in turn, the first rotating each
round, and medians are reported.
Printed (and written to docs/bert_speed.md):

  train tokens/s ours/peer = X
  encode tokens/s ours/peer = X
  CPU MFU = X%      model FLOPs/s of our train step / the best 2048² matmul rate

Model FLOPs count matmuls as gpt_speed does (PaLM's appendix B): 6 per matmul parameter per
token (the MLM head's dense and tied output projection included; the pooler and NSP head
once per row), plus 12·L·T·D for attention (no causal half here: all of it is used). An
encoded token costs 2 per encoder matmul parameter plus 4·L·T·D.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import types

import numpy as np

from bench import common

ADAMW = common.AdamW(learning_rate=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                     clip_norm=1.0)  # BERT's, with clipping
MASK_RATE, MASK_FRACTION, RANDOM_FRACTION = 0.15, 0.8, 0.1
PAD, UNK, CLS, SEP, MASK = range(5)  # the special ids; ordinary tokens are 5..vocab-1
SPECIAL_IDS = (PAD, UNK, CLS, SEP, MASK)
PEERS = ('sdpa', 'eager')
GATHERED = 'ours_gathered'  # the side that runs the MLM head at labelled positions only


@dataclasses.dataclass(frozen=True)
class Shape:
  """The benchmarked model and batch, identical on both sides."""
  layers: int = 4
  width: int = 512
  heads: int = 8
  mlp: int = 2048
  vocab: int = 8192
  seq: int = 128
  batch: int = 16

  @property
  def tokens_per_step(self) -> int:
    return self.batch * self.seq

  def encoder_matmul_params(self) -> int:
    return self.layers * (4 * self.width**2 + 2 * self.width * self.mlp)

  def train_flops_per_token(self) -> float:
    """6 per matmul parameter (encoder, MLM head, tied output; pooler and NSP per row)
    plus attention's two matmuls over the full T x T."""
    per_token = self.encoder_matmul_params() + self.width**2 + self.vocab * self.width
    per_row = self.width**2 + 2 * self.width
    return 6 * (per_token + per_row / self.seq) + 12 * self.layers * self.seq * self.width

  def encode_flops_per_token(self) -> float:
    return 2 * self.encoder_matmul_params() + 4 * self.layers * self.seq * self.width


def make_pairs(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
  """Sentence pairs `[CLS] A [SEP] B [SEP]` filling each row: tokens, token types, NSP
  labels (0 = B follows A), int64 [B, T] / [B]."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(len(SPECIAL_IDS), shape.vocab, (shape.batch, shape.seq))
  types_ = np.zeros_like(tokens)
  for row, split in enumerate(rng.integers(shape.seq // 4, 3 * shape.seq // 4, shape.batch)):
    tokens[row, [0, split, shape.seq - 1]] = CLS, SEP, SEP
    types_[row, split + 1:] = 1
  return {'tokens': tokens, 'token_types': types_,
          'nsp_label': rng.integers(0, 2, shape.batch)}


def peer_masks(tokens: np.ndarray, vocab: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(corrupted inputs, labels with -100 where not labelled), [B, T] each: per row
  ⌊15%·n + u⌋ of its n non-special tokens labelled, 80% [MASK] / 10% random / 10% kept."""
  return common.peer_masks(tokens, vocab, special_ids=SPECIAL_IDS, mask_id=MASK,
                           rate=MASK_RATE, mask_fraction=MASK_FRACTION,
                           random_fraction=RANDOM_FRACTION, seed=seed)


def bert_config(shape: Shape, dropout: float):
  from models import bert  # pylint: disable=g-import-not-at-top
  return bert.BertConfig(vocab_size=shape.vocab, max_len=shape.seq, num_layers=shape.layers,
                         num_heads=shape.heads, embed_dim=shape.width, mlp_dim=shape.mlp,
                         dropout_rate=dropout)


# --------------------------------------------------------------------------- our side


def gathered_loss_fn(params, batch, rng, *, model, deterministic: bool = False, settings,
                     max_predictions: int):
  """bert_pretraining.loss_fn with the MLM head run only at the labelled positions: the
  first `max_predictions` per row (BERT's max_predictions_per_seq), gathered before the
  head. A what-if for docs/benchmarks.md (models/bert.py scores all T positions); the
  model's own [B, T, V] logits go unused, so XLA drops them."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from objectives import masked_lm
  from objectives import next_sentence
  inputs_BT, targets_BT, weights_BT = masked_lm.masked_inputs(batch, rng, settings.masking)
  outputs = masked_lm.apply_encoder(params, batch, inputs_BT, masked_lm.dropout_rng(rng),
                                    model=model, deterministic=deterministic)
  _, take = common.labelled_positions(weights_BT, max_predictions)
  logits_BMV = common.mlm_head_at(params, params['token_embed']['embedding'],
                                  take(outputs['hidden']), model.config)
  sums = masked_lm.mlm_sums(logits_BMV, take(targets_BT), take(weights_BT))
  sums.update(next_sentence.nsp_sums(outputs['nsp_logits'], batch['nsp_label'],
                                     next_sentence.real_rows(batch)))
  sums['weight'] = sums['nsp_weight']
  mlm_loss = sums['mlm_loss_sum'] / jnp.maximum(sums['mlm_weight'], 1.0)
  nsp_loss = sums['nsp_loss_sum'] / jnp.maximum(sums['nsp_weight'], 1.0)
  return mlm_loss + settings.nsp_weight * nsp_loss, sums


class Ours(common.JaxSide):
  """contextual's BERT, its objective and real train step (training/step.py), and its
  forward pass for features."""

  def __init__(self, setup: tuple[Shape, float, bool]):
    import functools  # pylint: disable=g-import-not-at-top
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import objectives
    from models import bert
    shape, dropout, gathered = setup
    self.model = bert.BERT(bert_config(shape, dropout))
    tokenizer = types.SimpleNamespace(mask_id=MASK, vocab_size=shape.vocab,
                                      special_ids=SPECIAL_IDS)
    objective = objectives.build(
        'bert_pretraining', {'rate': MASK_RATE, 'mask_fraction': MASK_FRACTION,
                             'random_fraction': RANDOM_FRACTION}, tokenizer=tokenizer)
    pairs = make_pairs(shape)
    batch = {**common.encoder_batch(pairs['tokens'], pairs['token_types']),
             'nsp_label': jnp.asarray(pairs['nsp_label'], jnp.int32)}
    params = nn.unbox(self.model.init(jax.random.key(0), batch['inputs'])['params'])
    loss_fn = objective.loss_fn
    if gathered:  # The same loss (checked here), the MLM head at labelled positions only.
      loss_fn = functools.partial(gathered_loss_fn, settings=objective.settings,
                                  max_predictions=int(MASK_RATE * shape.seq) + 1)
      full, part = (jax.jit(functools.partial(f, model=self.model))(
          params, batch, jax.random.key(0))[0] for f in (objective.loss_fn, loss_fn))
      np.testing.assert_allclose(part, full, rtol=1e-5)
    self.init_train(self.model, params, loss_fn, batch, ADAMW)
    self._encode = jax.jit(lambda p, b: self.model.apply(
        {'params': p}, b['inputs'], token_types_BT=b['token_types'],
        segment_ids_BT=b['segment_ids'], positions_BT=b['positions'])['hidden'])

  def warm_up(self) -> None:
    self.train(1)  # Compiles both, and warms the allocator.
    self.encode(1)

  def encode(self, repeats: int) -> list[float]:
    return common.timed(
        lambda: self._encode(self.state.params, self.batch).block_until_ready(), repeats)


# -------------------------------------------------------------------------- the peer


class Peer(common.TorchSide):
  """transformers' BertForPreTraining with torch.optim.AdamW, as their docs use them."""

  def __init__(self, setup: tuple[Shape, dict, str]):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers
    shape, hf_config, attention = setup
    torch.manual_seed(0)
    config = transformers.BertConfig(**hf_config, attn_implementation=attention)
    model = transformers.BertForPreTraining(config).train()
    self.init_train(model, ADAMW, model.config._attn_implementation)
    pairs = make_pairs(shape)
    inputs, labels = peer_masks(pairs['tokens'], shape.vocab)
    self.features = {'input_ids': torch.from_numpy(inputs),
                     'token_type_ids': torch.from_numpy(pairs['token_types']),
                     'attention_mask': torch.ones(inputs.shape, dtype=torch.int64)}
    self.labels = {'labels': torch.from_numpy(labels),
                   'next_sentence_label': torch.from_numpy(pairs['nsp_label'])}

  def warm_up(self) -> None:
    self.train(1)  # Warms the allocator.
    self.encode(1)

  def step_loss(self):
    return self.model(**self.features, **self.labels).loss

  def encode(self, repeats: int) -> list[float]:
    self.model.eval()
    with self._torch.inference_mode():
      return common.timed(lambda: self.model.bert(**self.features).last_hidden_state, repeats)


# ---------------------------------------------------------------------------- driver


def run(shape: Shape, rounds: int, steps: int, encodes: int, matmul_repeats: int,
        dropout: float, peers: tuple[str, ...], gathered: bool,
        env: dict[str, dict[str, str | None]]) -> dict:
  """Measures every side in rotating rounds; returns the medians and derived ratios."""
  from hf import bert as hf_bert  # pylint: disable=g-import-not-at-top
  hf_config = hf_bert.config_to_hf(bert_config(shape, dropout))
  specs = {'ours': (Ours, (shape, dropout, False), env['ours'])}
  if gathered:
    specs[GATHERED] = (Ours, (shape, dropout, True), env['ours'])
  specs.update({p: (Peer, (shape, hf_config, p), env['peer']) for p in peers})
  whats = ('matmul', 'train', 'encode')
  with common.started(specs) as sides:
    info = {name: side('describe') for name, side in sides.items()}
    if len({i['params'] for i in info.values()}) != 1:
      raise RuntimeError(f'the models differ: {info}')
    samples = {(name, what): [] for name in sides for what in whats}
    for r in range(rounds):
      for name in common.round_order(list(sides), r):
        samples[name, 'matmul'].append(sides[name]('matmul', matmul_repeats))
        samples[name, 'train'].extend(sides[name]('train', steps))
        if name != GATHERED:  # Its encoder is ours.
          samples[name, 'encode'].extend(sides[name]('encode', encodes))
      print(f'round {r + 1}/{rounds}: train s/step ' + ', '.join(
          f'{n} {statistics.median(samples[n, "train"]):.3f}' for n in sides), flush=True)
    losses = {name: side('loss') for name, side in sides.items()}

  train_s = {n: statistics.median(samples[n, 'train']) for n in sides}
  encode_s = {n: statistics.median(samples[n, 'encode']) for n in sides if n != GATHERED}
  peak = max(max(samples[n, 'matmul']) for n in sides)
  train_peer = min(peers, key=train_s.get)
  encode_peer = min(peers, key=encode_s.get)
  tokens = shape.tokens_per_step
  # Model FLOPs are those of the model as it is (all positions scored): not the what-if's.
  train_gflops = {n: shape.train_flops_per_token() * tokens / train_s[n] / 1e9
                  for n in sides if n != GATHERED}
  encode_gflops = {n: shape.encode_flops_per_token() * tokens / encode_s[n] / 1e9
                   for n in encode_s}
  return {
      'shape': dataclasses.asdict(shape), 'dropout': dropout, 'rounds': rounds,
      'steps': steps, 'encodes': encodes,
      'glibc_tunables': {'ours': env['ours'].get('GLIBC_TUNABLES'),
                         'peer': env['peer'].get('GLIBC_TUNABLES')},
      'frameworks': {n: info[n]['framework'] for n in sides},
      'params': info['ours']['params'], 'first_loss': losses,
      'train_s_per_step': train_s, 'encode_s_per_batch': encode_s,
      'train_tokens_per_s': {n: tokens / train_s[n] for n in sides},
      'encode_tokens_per_s': {n: tokens / encode_s[n] for n in encode_s},
      'train_peer': train_peer, 'encode_peer': encode_peer,
      'train_ratio': train_s[train_peer] / train_s['ours'],
      'encode_ratio': encode_s[encode_peer] / encode_s['ours'],
      'train_model_gflops_per_s': train_gflops, 'encode_model_gflops_per_s': encode_gflops,
      'matmul_gflops_per_s': {n: max(samples[n, 'matmul']) for n in sides},
      'train_mfu': {n: train_gflops[n] / peak for n in train_gflops},
      'encode_mfu': {n: encode_gflops[n] / peak for n in encode_s},
      # The what-if: the MLM head at labelled positions only (`gathered_loss_fn`).
      **({'gathered_train_ratio': train_s[train_peer] / train_s[GATHERED],
          'gathered_speedup': train_s['ours'] / train_s[GATHERED]} if GATHERED in sides else {}),
  }


def report(result: dict, command: str) -> str:
  """The markdown page: what ran where, a table, and the three headline lines."""
  s, names = result['shape'], list(result['frameworks'])
  titles = {'ours': 'ours (JAX)', GATHERED: 'ours, MLM head at labelled positions only (JAX)',
            **{p: f'peer {p} (PyTorch)' for p in PEERS}}

  def row(label, values, fmt, ratio='', unit=''):
    return common.table_row(label, values, names, fmt, ratio, unit)

  pct = {k: {n: 100 * v for n, v in result[k].items()} for k in ('train_mfu', 'encode_mfu')}
  lines = [
      '# BERT speed: contextual vs Hugging Face transformers (PyTorch)', '',
      f'Command: `{command}`', '',
      common.machine_line(), '',
      'Sides: ' + '; '.join(f'{n}: {f}' for n, f in result['frameworks'].items()) + '.', '',
      (f'GLIBC_TUNABLES: ours {result["glibc_tunables"]["ours"] or "unset"}; peer '
       f'{result["glibc_tunables"]["peer"] or "unset"}.'), '',
      (f'Model: BERT, {s["layers"]} layers, width {s["width"]}, {s["heads"]} heads, MLP '
       f'{s["mlp"]}, vocabulary {s["vocab"]}, {result["params"]:,} parameters on every side; '
       f'batch {s["batch"]} x {s["seq"]} tokens (sentence pairs), float32, dropout '
       f'{result["dropout"]}, MLM (15% labelled) + NSP, AdamW + clipping. Medians over '
       f'{result["rounds"]} rotating rounds of {result["steps"]} train steps and '
       f'{result["encodes"]} encodes. First losses: '
       + ', '.join(f'{n} {v:.4f}' for n, v in result['first_loss'].items()) + '.'), '',
      f'Ratios are against the faster peer on each measure: train {result["train_peer"]}, '
      f'encode {result["encode_peer"]}.', '',
      '| measure | ' + ' | '.join(titles[n] for n in names) + ' | ours/peer |',
      '|---|' + '---|' * (len(names) + 1),
      row('train step (s)', result['train_s_per_step'], '.3f'),
      row('train tokens/s', result['train_tokens_per_s'], '.0f', f'{result["train_ratio"]:.2f}'),
      row('train model GFLOP/s', result['train_model_gflops_per_s'], '.1f'),
      row('train MFU (vs the best matmul)', pct['train_mfu'], '.1f', unit='%'),
      row('encode batch (s)', result['encode_s_per_batch'], '.3f'),
      row('encode tokens/s', result['encode_tokens_per_s'], '.0f',
          f'{result["encode_ratio"]:.2f}'),
      row('encode model GFLOP/s', result['encode_model_gflops_per_s'], '.1f'),
      row('encode MFU (vs the best matmul)', pct['encode_mfu'], '.1f', unit='%'),
      row('2048² matmul GFLOP/s (best)', result['matmul_gflops_per_s'], '.1f'), '',
      'MFU percentages are of the best 2048² matmul rate of any side in this run.', '',
      *([f'What-if, MLM head at labelled positions only ({GATHERED}, not what '
         f'models/bert.py does): train tokens/s {result["gathered_train_ratio"]:.2f}x the '
         f'faster peer, {result["gathered_speedup"]:.2f}x ours as it is.', '']
        if 'gathered_speedup' in result else []),
      '```', *headline(result), '```', '',
      '```json', json.dumps(result, indent=1), '```', '']
  return '\n'.join(lines)


def headline(result: dict) -> list[str]:
  return [f'train tokens/s ours/peer = {result["train_ratio"]:.2f}',
          f'encode tokens/s ours/peer = {result["encode_ratio"]:.2f}',
          f'CPU MFU = {100 * result["train_mfu"]["ours"]:.1f}%']


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for field in dataclasses.fields(Shape):
    parser.add_argument(f'--{field.name}', type=int, default=field.default)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='train steps timed per round')
  parser.add_argument('--encodes', type=int, default=6, help='encodes timed per round')
  parser.add_argument('--matmul_repeats', type=int, default=5)
  parser.add_argument('--dropout', type=float, default=0.0, help='on both sides')
  parser.add_argument('--peers', default=','.join(PEERS),
                      help="the peer's attention implementations, each a side of its own")
  parser.add_argument('--gathered', action=argparse.BooleanOptionalAction, default=True,
                      help='also time ours with the MLM head at labelled positions only')
  parser.add_argument('--out', default=f'{common.DOCS}/bert_speed.md')
  parser.add_argument('--peer_tunables', choices=('default', 'ours'), default='default',
                      help="the peer's glibc malloc settings (see bench/gpt_speed.py)")
  args = parser.parse_args(argv)
  shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
  peers = tuple(args.peers.split(','))
  if not set(peers) <= set(PEERS) or not peers:
    parser.error(f'--peers must name some of {PEERS}')
  env = dict(zip(('ours', 'peer'), common.tunables_env(args.peer_tunables)))
  result = run(shape, args.rounds, args.steps, args.encodes, args.matmul_repeats, args.dropout,
               peers, args.gathered, env)
  command = 'python -m bench.bert_speed ' + ' '.join(sys.argv[1:] if argv is None else argv)
  page = report(result, command.strip())
  with open(args.out, 'w') as f:
    f.write(page)
  print('\n'.join(headline(result)))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
