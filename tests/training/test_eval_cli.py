"""eval.py as a user runs it on a finished run: --prompt, --sampling, --unigram_baseline."""

import importlib
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from models import decoding
from training import baselines

PROMPT = 'in the beginning'


@pytest.fixture(scope='module')
def eval_output(finished_run):
  _, workdir = finished_run
  result = subprocess.run(
      [sys.executable, 'eval.py', f'--workdir={workdir}', '--splits=validation',
       '--unigram_baseline', f'--prompt={PROMPT}', '--sampling=greedy,top_k',
       '--max_new_tokens=6', '--seed=3'],
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  assert result.returncode == 0, result.stderr
  return result.stdout


@pytest.fixture(scope='module')
def evaluator(finished_run):
  _, workdir = finished_run
  ev = importlib.import_module('eval').Evaluator(workdir)
  return ev, ev.restore(5)


def _continuation(output: str, sampler: str) -> str:
  section = output.split(f'\n[{sampler}]\n')[1]
  match = re.match(rf"  '{PROMPT}' -> '(.*)'\n", section)
  assert match, section
  return match.group(1)


def test_prompt_generates_what_the_decoder_gives_for_each_sampler(eval_output, evaluator):
  ev, state = evaluator
  tok = ev.exp.tokenizer
  expected = {}
  for name, sampler in (('greedy', decoding.make_sampler('greedy')),
                        ('top_k', decoding.make_sampler('top_k', k=40, temperature=0.8))):
    tokens = decoding.generate(ev.exp.model, state.params, [[tok.bos_id] + tok.encode(PROMPT)],
                               jax.random.key(3), max_new_tokens=6, sampler=sampler,
                               eos_id=tok.eos_id, pad_id=tok.pad_id)
    expected[name] = tok.decode(list(np.asarray(tokens)[0]))
    assert _continuation(eval_output, name) == expected[name], name


def test_unigram_baseline_is_reported_beside_the_models_perplexity(eval_output, evaluator):
  ev, _ = evaluator
  reported = float(re.search(r'unigram baseline validation perplexity: ([\d.]+)',
                             eval_output).group(1))
  expected = baselines.unigram_perplexity(ev.batches('train'), ev.batches('validation'),
                                          ev.exp.tokenizer.vocab_size)
  assert reported == pytest.approx(expected, abs=1e-4)
  model = float(re.search(r'model validation perplexity: ([\d.]+)', eval_output).group(1))
  assert model == pytest.approx(_table(eval_output)['validation']['perplexity'], abs=1e-4)


def _table(output: str) -> dict[str, dict[str, float]]:
  """{split: {column: value}} of the table eval.py prints."""
  rows = [[c.strip() for c in line.strip('|').split('|')]
          for line in output.splitlines() if line.startswith('| ')]
  header = rows[0]
  return {row[0]: {name: float(v) for name, v in zip(header[1:], row[1:]) if v}
          for row in rows[1:]}


def test_unigram_perplexity_by_hand():
  """Targets are next tokens within a segment; add-one smoothing over the vocabulary."""
  train = [{'inputs': np.array([[1, 2, 2, 3]]), 'segment_ids': np.array([[1, 1, 1, 0]])}]
  valid = [{'inputs': np.array([[2, 3, 3]]), 'segment_ids': np.array([[1, 1, 2]])}]
  # train targets: 2, 2 (the pad's position is no target); valid targets: 3 (3 -> 3 crosses
  # segments). p(3) = (0 + 1) / (2 + 4).
  assert baselines.unigram_perplexity(train, valid, vocab_size=4) == pytest.approx(6.0)
  valid_2 = [{'inputs': np.array([[1, 2]]), 'segment_ids': np.array([[1, 1]])}]
  assert baselines.unigram_perplexity(train, valid_2, vocab_size=4) == pytest.approx(2.0)
