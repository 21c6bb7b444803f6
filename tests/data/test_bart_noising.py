"""data/bart_noising.py: each of BART's noising functions on hand examples, its rate
statistically, BOS/EOS in place, determinism, and the composition's order."""

import numpy as np
import pytest

from data import bart_noising as bn

BOS, EOS, MASK, DOT = 0, 2, 3, 4
DOC = np.array([BOS, 10, 11, DOT, 12, 13, 14, DOT, 15, DOT, EOS])


def _doc(n, seed=0):
  inner = np.random.default_rng(seed).integers(10, 1000, n)
  return np.concatenate([[BOS], inner, [EOS]])


def _ends_kept(out):
  assert out[0] == BOS and out[-1] == EOS


def test_mask_tokens_replaces_exactly_the_rate_in_place():
  doc = _doc(100)
  out = bn.mask_tokens(doc, 1, rate=0.15, mask_id=MASK)
  _ends_kept(out)
  assert out.shape == doc.shape and (out == MASK).sum() == 15
  np.testing.assert_array_equal(out[out != MASK], doc[out != MASK])
  np.testing.assert_array_equal(out, bn.mask_tokens(doc, 1, rate=0.15, mask_id=MASK))
  assert not np.array_equal(out, bn.mask_tokens(doc, 2, rate=0.15, mask_id=MASK))


def test_mask_positions_are_uniform():
  hits = np.mean([bn.mask_tokens(_doc(20), s, rate=0.25, mask_id=MASK)[1:-1] == MASK
                  for s in range(2000)], axis=0)
  assert np.abs(hits - 0.25).max() < 0.05  # 2000 draws: ~5 standard errors


def test_delete_tokens_removes_the_rate_and_keeps_the_order():
  doc = _doc(100)
  out = bn.delete_tokens(doc, 1, rate=0.3)
  _ends_kept(out)
  assert len(out) == len(doc) - 30
  # What is left is a subsequence of the document.
  positions = [np.flatnonzero(doc == t) for t in out]
  assert all(p.size for p in positions)
  it = iter(doc)
  assert all(any(t == d for d in it) for t in out)


def test_infill_hand_example(monkeypatch):
  """Spans (1, 2): tokens 1-2 become one mask; (4, 0): a mask inserted before token 4."""
  monkeypatch.setattr(bn, 'infill_spans', lambda length, seed, **kw: [(1, 2), (4, 0)])
  doc = np.array([BOS, 10, 11, 12, 13, 14, 15, EOS])
  np.testing.assert_array_equal(bn.infill(doc, 0, rate=0.3, mask_id=MASK),
                                [BOS, 10, MASK, 13, MASK, 14, 15, EOS])


def test_infill_follows_its_spans():
  doc = _doc(40, seed=3)
  spans = bn.infill_spans(40, 5, rate=0.3)
  got = bn.infill(doc, 5, rate=0.3, mask_id=MASK)
  expected, cursor = [BOS], 1
  for start, span in spans:
    expected += list(doc[cursor:1 + start]) + [MASK]
    cursor = 1 + start + span
  expected += list(doc[cursor:])
  np.testing.assert_array_equal(got, expected)


def test_infill_spans_cover_exactly_the_rate_without_overlap():
  lengths, zero_length = [], 0
  for seed in range(500):
    spans = bn.infill_spans(100, seed, rate=0.3, poisson_lambda=3.0)
    assert sum(span for _, span in spans) == 30
    ends = [start + span for start, span in spans]
    assert all(e <= s for e, (s, _) in zip(ends, spans[1:])) and ends[-1] <= 100
    assert all(0 <= s <= 100 for s, _ in spans)
    lengths += [span for _, span in spans[:-1]]  # the last one is cut to fit
    zero_length += sum(span == 0 for _, span in spans)
  # Poisson(3): mean 3, P(0) = e^-3 ≈ 0.05 — over ~5000 spans.
  assert np.mean(lengths) == pytest.approx(3.0, abs=0.1)
  assert zero_length / len(lengths) == pytest.approx(np.exp(-3), abs=0.015)


def test_infill_shortens_by_span_lengths_minus_one_each():
  doc = _doc(100, seed=1)
  out = bn.infill(doc, 7, rate=0.3, mask_id=MASK)
  spans = bn.infill_spans(100, 7, rate=0.3)
  _ends_kept(out)
  assert (out == MASK).sum() == len(spans)
  assert len(out) == len(doc) - 30 + len(spans)


def test_permute_sentences_shuffles_whole_sentences():
  seen = set()
  for seed in range(50):
    out = bn.permute_sentences(DOC, seed, sentence_end_ids=(DOT,))
    _ends_kept(out)
    sentences = tuple(tuple(s) for s in np.split(out[1:-1], np.flatnonzero(out[1:-1] == DOT)[:-1] + 1))
    assert sorted(sentences) == sorted([(10, 11, DOT), (12, 13, 14, DOT), (15, DOT)])
    seen.add(sentences)
  assert len(seen) == 6  # all 3! orders occur


def test_permute_keeps_a_trailing_fragment_as_a_sentence():
  doc = np.array([BOS, 10, DOT, 11, 12, EOS])
  outs = {tuple(bn.permute_sentences(doc, s, sentence_end_ids=(DOT,))) for s in range(20)}
  assert outs == {(BOS, 10, DOT, 11, 12, EOS), (BOS, 11, 12, 10, DOT, EOS)}


def test_rotate_is_a_rotation_starting_anywhere():
  starts = []
  for seed in range(600):
    out = bn.rotate(DOC, seed)
    _ends_kept(out)
    inner = list(DOC[1:-1])
    start = next(k for k in range(len(inner)) if inner[k:] + inner[:k] == list(out[1:-1]))
    starts.append(start)
  counts = np.bincount(starts, minlength=9)
  assert counts.min() > 600 / 9 * 0.6  # every start occurs, about equally


def test_noise_composes_in_fairseqs_order_and_is_deterministic():
  recipe = bn.BartNoising(infill_rate=0.3, permute_sentences=True)
  doc = np.concatenate([[BOS], np.tile([20, 21, 22, DOT], 10), [EOS]])
  out = bn.noise(doc, (4, 9), recipe, mask_id=MASK, sentence_end_ids=(DOT,))
  np.testing.assert_array_equal(out, bn.noise(doc, (4, 9), recipe, mask_id=MASK,
                                              sentence_end_ids=(DOT,)))
  # Permutation first, then infilling on the permuted document, each with its own stream.
  permuted = bn.permute_sentences(doc, (4, 9, 0), sentence_end_ids=(DOT,))
  np.testing.assert_array_equal(out, bn.infill(permuted, (4, 9, 3), rate=0.3, mask_id=MASK))
  assert np.array_equal(bn.noise(doc, 1, bn.BartNoising(), mask_id=MASK), doc)
  with pytest.raises(ValueError, match='sentence_end_ids'):
    bn.noise(doc, 1, bn.BartNoising(permute_sentences=True), mask_id=MASK)


@pytest.mark.parametrize('kwargs, message', [
    (dict(mask_rate=1.5), 'mask_rate'), (dict(infill_rate=-0.1), 'infill_rate'),
    (dict(poisson_lambda=0.0), 'poisson_lambda')])
def test_bad_recipes_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    bn.BartNoising(**kwargs)


def test_a_document_needs_bos_and_eos():
  with pytest.raises(ValueError, match='BOS'):
    bn.rotate(np.array([5]), 0)
