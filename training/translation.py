"""Translation quality of a seq2seq run: decode sources with beam search, score the
detokenised outputs with sacrebleu's BLEU and chrF and rouge-score's ROUGE. A text-to-text
run (data/text_to_text.py) is scored task by task, each with its own metrics, from one
checkpoint: report keys 'task/metric' ('modernize/bleu', 'genre/accuracy').

Used by the training loop (BLEU on a slice of validation at each evaluation) and by
eval.py (whole splits, the translations written beside the scores, and sentences given on
the command line). The decoding settings are the config's `translate` block:

  beam_size, alpha        beam search and its GNMT length penalty (beam 1: greedy)
  max_len                 the most tokens an output may take
  batch_size              sources decoded at once
  eval_examples           validation pairs (text-to-text: of each task) scored at each
                          training evaluation (0: none)
"""

import dataclasses
import re
import time
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
import sacrebleu

from data import seq2seq_data
from data import text_to_text
from models import seq2seq_decoding

# What a seq2seq (translation) run is scored by.
SEQ2SEQ_METRICS = ('bleu', 'chrf', 'rouge')
# The scores each metric name gives (`scores`).
METRIC_KEYS = {'bleu': ('bleu',), 'chrf': ('chrf',), 'rouge': ('rouge1', 'rouge2', 'rougeL'),
               'accuracy': ('accuracy',)}


@dataclasses.dataclass(frozen=True)
class TranslateConfig:
  """The config's `translate` block."""
  beam_size: int = 4
  alpha: float = 0.6
  max_len: int = 64
  batch_size: int = 32
  eval_examples: int = 0

  def __post_init__(self):
    for name in ('beam_size', 'max_len', 'batch_size'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'config.translate.{name}={value!r} must be a positive integer')
    if self.eval_examples < 0:
      raise ValueError(f'config.translate.eval_examples={self.eval_examples} must be >= 0')


class _Words:
  """rouge-score's tokenizer interface: lowercased Unicode words. Its default keeps only
  ASCII a-z0-9, which would cut every accented Spanish word in pieces."""

  def tokenize(self, text: str) -> list[str]:
    return re.findall(r'\w+', text.lower())


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures ×100 (rouge-score, no stemming: the
  texts are not all English)."""
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], tokenizer=_Words())
  per_example = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
  return {k: 100 * float(np.mean([s[k].fmeasure for s in per_example]))
          for k in METRIC_KEYS['rouge']}


def accuracy(hypotheses: list[str], references: list[str]) -> float:
  """The share (0..1, as every accuracy here) of outputs equal to their reference, outer
  whitespace aside: a classification written as text is right only word for word."""
  return float(np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references)]))


def scores(hypotheses: list[str], references: list[str],
           metrics: tuple[str, ...] = ('bleu', 'chrf')) -> dict[str, float]:
  """The named metrics of detokenised outputs: corpus BLEU and chrF (sacrebleu's defaults:
  13a tokenisation, chrF with n=6, β=2), 'rouge' (rouge1, rouge2, rougeL: `rouge`),
  'accuracy' (exact match: `accuracy`)."""
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} references')
  unknown = [m for m in metrics if m not in METRIC_KEYS]
  if unknown:
    raise ValueError(f'unknown metrics {unknown}; known: {sorted(METRIC_KEYS)}')
  result = {}
  for metric in metrics:
    if metric == 'bleu':
      result['bleu'] = sacrebleu.corpus_bleu(hypotheses, [references]).score
    elif metric == 'chrf':
      result['chrf'] = sacrebleu.corpus_chrf(hypotheses, [references]).score
    elif metric == 'rouge':
      result.update(rouge(hypotheses, references))
    else:
      result['accuracy'] = accuracy(hypotheses, references)
  return result


def task_score_names(data_cfg) -> list[str]:
  """A text-to-text run's report keys of the model's scores: 'task/metric' per task."""
  return [f'{task.name}/{key}' for task in text_to_text.mixture_tasks(data_cfg)
          for metric in task.metrics for key in METRIC_KEYS[metric]]


def translate(exp, params: Any, sources: list[str], settings: TranslateConfig,
              progress: bool = False) -> list[str]:
  """The best beam's detokenised output for each source text, in order."""
  tokenizer, model = exp.tokenizer, exp.model
  source_len = exp.data.seq_len
  outputs = []
  start = time.time()
  for first in range(0, len(sources), settings.batch_size):
    texts = sources[first:first + settings.batch_size]
    # Full batches only: the last is padded with empty rows, so one compilation serves all.
    tokens_BS, segment_ids_BS = seq2seq_data.source_rows(
        tokenizer, texts + [''] * (settings.batch_size - len(texts)), source_len)
    best_BRL, _ = seq2seq_decoding.translate(
        model, params, tokens_BS, segment_ids_BS=segment_ids_BS, max_len=settings.max_len,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        beam_size=settings.beam_size, alpha=settings.alpha)
    # Ids above the tokenizer's are a pretrained T5's sentinels (config.data.extra_ids),
    # which span corruption taught it to write; they are no text, so they are dropped.
    outputs += [tokenizer.decode([int(i) for i in row if i < tokenizer.vocab_size])
                for row in np.asarray(best_BRL[:len(texts), 0])]
    if progress:
      print(f'  translated {len(outputs)}/{len(sources)} ({time.time() - start:.0f}s)',
            flush=True)
  return outputs


def evaluate(exp, params: Any, split: str, settings: TranslateConfig, max_examples: int = 0,
             progress: bool = False) -> tuple[dict[str, float], list[dict[str, str]]]:
  """(report, rows) over the first `max_examples` pairs of a split (0: all).

  A seq2seq run: {bleu, chrf, rouge1, rouge2, rougeL, the copy-the-source baseline's as
  copy_<name>, examples}; rows {source, reference, translation}. A text-to-text run: the
  same per task of its mixture, with the task's own metrics and baseline, keyed
  'task/<name>', 'task/copy_<name>' or 'task/majority_<name>', 'task/examples'; rows gain
  'task' (their source is the model's input, prefix included).
  """
  if exp.data.task == 'text_to_text':
    return _evaluate_tasks(exp, params, split, settings, max_examples, progress)
  pairs = seq2seq_data.pair_texts(exp.data, split, max_examples)
  sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
  hypotheses = translate(exp, params, sources, settings, progress=progress)
  copy = scores(sources, references, SEQ2SEQ_METRICS)
  report = {**scores(hypotheses, references, SEQ2SEQ_METRICS),
            **{f'copy_{k}': v for k, v in copy.items()},
            'examples': float(len(pairs))}
  rows = [{'source': s, 'reference': r, 'translation': h}
          for s, r, h in zip(sources, references, hypotheses)]
  return report, rows


def _evaluate_tasks(exp, params: Any, split: str, settings: TranslateConfig,
                    max_examples: int, progress: bool
                    ) -> tuple[dict[str, float], list[dict[str, str]]]:
  """Each task of the mixture on `split`, scored by its metrics beside its baseline."""
  report, rows = {}, []
  for task in text_to_text.mixture_tasks(exp.data):
    examples = text_to_text.examples(exp.data, task, split, max_examples)
    inputs = [e['inputs'] for e in examples]
    references = [e['targets'] for e in examples]
    if progress:
      print(f' task {task.name}: {len(examples)} examples', flush=True)
    hypotheses = translate(exp, params, inputs, settings, progress=progress)
    if task.baseline == 'copy':  # the source text itself, without the prefix
      baseline = [e['source'] for e in examples]
    else:
      baseline = [text_to_text.majority_target(exp.data, task)] * len(examples)
    report.update({f'{task.name}/{k}': v
                   for k, v in scores(hypotheses, references, task.metrics).items()})
    report.update({f'{task.name}/{task.baseline}_{k}': v
                   for k, v in scores(baseline, references, task.metrics).items()})
    report[f'{task.name}/examples'] = float(len(examples))
    rows += [{'task': task.name, 'source': i, 'reference': r, 'translation': h}
             for i, r, h in zip(inputs, references, hypotheses)]
  return report, rows
