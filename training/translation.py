"""Translation quality of a seq2seq run: decode sources with beam search, score the
detokenised outputs with sacrebleu's BLEU and chrF.

Used by the training loop (BLEU on a slice of validation at each evaluation) and by
eval.py (whole splits, the translations written beside the scores, and sentences given on
the command line). The decoding settings are the config's `translate` block:

  beam_size, alpha        beam search and its GNMT length penalty (beam 1: greedy)
  max_len                 the most tokens an output may take
  batch_size              sources decoded at once
  eval_examples           validation pairs scored at each training evaluation (0: none)
"""

import dataclasses
import time
from typing import Any

import numpy as np
import sacrebleu

from data import seq2seq_data
from models import seq2seq_decoding


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


def scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
  """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenisation, chrF with n=6, β=2)."""
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} references')
  return {'bleu': sacrebleu.corpus_bleu(hypotheses, [references]).score,
          'chrf': sacrebleu.corpus_chrf(hypotheses, [references]).score}


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
    outputs += [tokenizer.decode(list(row)) for row in np.asarray(best_BRL[:len(texts), 0])]
    if progress:
      print(f'  translated {len(outputs)}/{len(sources)} ({time.time() - start:.0f}s)',
            flush=True)
  return outputs


def evaluate(exp, params: Any, split: str, settings: TranslateConfig, max_examples: int = 0,
             progress: bool = False) -> tuple[dict[str, float], list[dict[str, str]]]:
  """({bleu, chrf, and the copy-the-source baseline's}, the rows: source, reference,
  translation) over the first `max_examples` pairs of a split (0: all)."""
  pairs = seq2seq_data.pair_texts(exp.data, split, max_examples)
  sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
  hypotheses = translate(exp, params, sources, settings, progress=progress)
  copy = scores(sources, references)
  report = {**scores(hypotheses, references),
            'copy_bleu': copy['bleu'], 'copy_chrf': copy['chrf'],
            'examples': float(len(pairs))}
  rows = [{'source': s, 'reference': r, 'translation': h}
          for s, r, h in zip(sources, references, hypotheses)]
  return report, rows
