"""Tests of the attention masks: exact arrays, compositions, registry, kernels, GPT."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from models import gpt
from tests import tolerances

index = attention.sequence_index


def _rows(*rows):
  return np.array([[int(c) for c in row] for row in rows], bool)


def test_bidirectional_mask_is_all_true():
  mask = attention.make_mask('bidirectional')(index(2, 3), index(2, 4))
  assert mask.shape == (2, 1, 3, 4) and mask.dtype == jnp.bool_ and mask.all()


def test_prefix_lm_mask_exact_per_row():
  mask = attention.prefix_lm_mask(index(2, 5), jnp.array([2, 0]))
  np.testing.assert_array_equal(mask[0, 0], _rows('11000', '11000', '11100', '11110', '11111'))
  np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((5, 5), bool)))  # No prefix.


def test_sliding_window_mask_exact():
  mask = attention.sliding_window_mask(index(1, 5), window=2)
  np.testing.assert_array_equal(mask[0, 0], _rows('11000', '11100', '01110', '00111', '00011'))
  causal = attention.sliding_window_mask(index(1, 5), window=3, causal=True)
  np.testing.assert_array_equal(causal[0, 0],
                                _rows('10000', '11000', '11100', '01110', '00111'))


def test_sliding_window_mask_of_a_chunk_over_a_cache():
  # Queries at slots 3 and 4 of a 6-slot cache, window 2.
  mask = attention.sliding_window_mask(index(1, 2, 3), index(1, 6), window=2, causal=True)
  np.testing.assert_array_equal(mask[0, 0], _rows('001100', '000110'))


def test_bigbird_layout_without_random_blocks_exact():
  layout = attention.bigbird_layout(5, 5, window=1, num_global=1, num_random=0, seed=0,
                                    causal=False)
  np.testing.assert_array_equal(layout, _rows('11111', '11100', '11110', '10111', '10011'))


def test_bigbird_mask_causal_exact():
  # Blocks of 2; each block sees block 0 (global) and itself, causally within a block.
  mask = attention.bigbird_mask(index(1, 8), block_size=2, window=0, num_global=1,
                                num_random=0, causal=True)
  expected = _rows('10000000', '11000000', '11100000', '11110000',
                   '11001000', '11001100', '11000010', '11000011')
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_bigbird_random_blocks_deterministic_and_within_rules():
  kwargs = dict(window=1, num_global=1, num_random=2, causal=False)
  layout = attention.bigbird_layout(12, 12, seed=3, **kwargs)
  np.testing.assert_array_equal(layout, attention.bigbird_layout(12, 12, seed=3, **kwargs))
  assert not np.array_equal(layout, attention.bigbird_layout(12, 12, seed=4, **kwargs))
  base = attention.bigbird_layout(12, 12, seed=3, **{**kwargs, 'num_random': 0})
  assert (layout >= base).all()
  np.testing.assert_array_equal((layout & ~base).sum(1)[1:], 2)  # r per non-global row.
  # Causal: random blocks only from the past, and more blocks extend the layout.
  causal = attention.bigbird_layout(12, 12, window=1, num_global=1, num_random=2, seed=3,
                                    causal=True)
  assert not np.triu(causal, 1).any()
  longer = attention.bigbird_layout(16, 16, window=1, num_global=1, num_random=2, seed=3,
                                    causal=True)
  np.testing.assert_array_equal(longer[:12, :12], causal)


def test_masks_compose_with_segments_and_padding():
  segments = jnp.array([[1, 1, 1, 2, 2, 0]])
  mask = (attention.sliding_window_mask(index(1, 6), window=2, causal=True)
          & attention.segment_mask(segments))
  np.testing.assert_array_equal(
      mask[0, 0], _rows('100000', '110000', '011000', '000100', '000110', '000000'))
  mask = attention.prefix_lm_mask(index(1, 4), jnp.array([2])) & attention.padding_mask(
      jnp.array([[True, True, True, False]]))
  np.testing.assert_array_equal(mask[0, 0], _rows('1100', '1100', '1110', '0000'))


def test_registry_picks_settings_and_names_bad_ones():
  mask = attention.make_mask('sliding_window', window=3, causal=True, block_size=0,
                             global_blocks=5)  # Not a sliding-window setting: dropped.
  assert mask == attention.SlidingWindowMask(window=3, causal=True, block_size=3)
  assert mask.autoregressive and not attention.make_mask('bidirectional').autoregressive
  with pytest.raises(ValueError, match="unknown attention mask 'dilated'"):
    attention.make_mask('dilated')
  with pytest.raises(ValueError, match='^window must'):
    attention.make_mask('sliding_window', window=0)
  with pytest.raises(ValueError, match='^block_size must'):
    attention.make_mask('bigbird', block_size=0)
  with pytest.raises(ValueError, match='prefix_lengths_B'):
    attention.make_mask('prefix_lm')(index(1, 3))
  with pytest.raises(ValueError, match='prefix_lengths_B'):
    attention.make_mask('causal')(index(1, 3), prefix_lengths_B=jnp.array([1]))


ALL_MASKS = {
    'bidirectional': lambda i: attention.bidirectional_mask(i),
    'causal': lambda i: attention.causal_mask(i),
    'prefix_lm': lambda i: attention.prefix_lm_mask(i, jnp.array([3, 0])),
    'sliding_window': lambda i: attention.sliding_window_mask(i, window=3),
    'sliding_window_causal': lambda i: attention.sliding_window_mask(i, window=3, causal=True),
    'bigbird': lambda i: attention.bigbird_mask(i, block_size=2, seed=1),
    'bigbird_causal': lambda i: attention.bigbird_mask(i, block_size=2, seed=1, causal=True),
    'padding': lambda i: attention.padding_mask(jnp.array([[1] * 10, [1] * 7 + [0] * 3]) > 0),
    'segments': lambda i: attention.segment_mask(jnp.array([[1] * 4 + [2] * 6,
                                                            [1] * 6 + [0] * 4])),
}


def _qkv(seed, shape, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3)]


@pytest.mark.parametrize('name', sorted(ALL_MASKS))
def test_every_mask_gives_the_same_attention_with_every_kernel_xla_only_on_cpu(name):
  """On CPU kernel='cudnn' runs jax.nn.dot_product_attention's XLA version, not cuDNN.

  So on CPU this checks that each mask reaches that kernel as it reaches our einsum (XLA
  against XLA); the comparison with cuDNN itself is the gpu-marked
  test_cudnn_equals_einsum_on_gpu_for_every_mask.
  """
  q, k, v = _qkv(0, (2, 10, 2, 4))
  mask = ALL_MASKS[name](index(2, 10))
  attend = jax.jit(attention.attend, static_argnames=('kernel',))
  xla = attend(q, k, v, mask_B1TS=mask, kernel='xla')
  tolerances.assert_close(attend(q, k, v, mask_B1TS=mask, kernel='cudnn'), xla, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize('name', sorted(ALL_MASKS))
def test_cudnn_equals_einsum_on_gpu_for_every_mask(name):
  assert jax.default_backend() == 'gpu'
  q, k, v = _qkv(0, (2, 10, 2, 64), jnp.bfloat16)
  mask = ALL_MASKS[name](index(2, 10))
  assert attention._cudnn_unsupported(q) is None
  xla = attention.attend(q, k, v, mask_B1TS=mask, kernel='xla')
  cudnn = jax.jit(functools.partial(attention.attend, kernel='cudnn'))(q, k, v,
                                                                       mask_B1TS=mask)
  np.testing.assert_allclose(np.asarray(cudnn, np.float32), np.asarray(xla, np.float32),
                             atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------- GPT

TINY = dict(vocab_size=32, max_len=16, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32)


@pytest.mark.parametrize('change, field', [
    (dict(mask='dilated'), 'mask'),
    (dict(mask='bidirectional'), 'mask'),
    (dict(mask='sliding_window'), 'window'),
    (dict(mask='bigbird'), 'block_size'),
    (dict(mask='bigbird', block_size=4, random_blocks=-1), 'random_blocks'),
])
def test_gpt_config_validation_names_the_mask_field(change, field):
  with pytest.raises(ValueError, match=f'GPTConfig.{field}'):
    gpt.GPTConfig(**{**TINY, **change})


def _init(config, tokens, **kwargs):
  model = gpt.GPT(config)
  params = nn.unbox(jax.jit(functools.partial(model.init, **kwargs))(
      jax.random.key(0, impl='rbg'), tokens))['params']
  return model, params


def test_gpt_prefix_lm_reads_the_prefix_both_ways():
  model, params = _init(gpt.GPTConfig(**TINY, mask='prefix_lm'), jnp.zeros((1, 6), jnp.int32),
                        prefix_lengths_B=jnp.array([6]))
  apply = jax.jit(model.apply)
  tokens = jnp.array([[3, 1, 4, 1, 5, 9], [3, 1, 4, 1, 5, 9]])
  changed_2 = tokens.at[:, 2].set(7)
  prefix = jnp.array([3, 0])  # Row 0: a prefix of 3 slots; row 1: none (plain causal).
  before = apply({'params': params}, tokens, prefix_lengths_B=prefix)
  after = apply({'params': params}, changed_2, prefix_lengths_B=prefix)
  assert not np.allclose(before[0, :2], after[0, :2])  # Inside the prefix: seen earlier.
  tolerances.assert_close(after[1, :2], before[1, :2])  # Causal row: not.
  changed_4 = tokens.at[:, 4].set(7)  # After the prefix: causal in both rows.
  after = apply({'params': params}, changed_4, prefix_lengths_B=prefix)
  tolerances.assert_close(after[:, :4], before[:, :4])
  with pytest.raises(ValueError, match='prefix_lengths_B'):
    apply({'params': params}, tokens)


def _decode_equals_full(config, length=12, chunks=((0, 5), (5, 6), (6, 9), (9, 10),
                                                    (10, 12))):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, length)), jnp.int32)
  model, params = _init(config, tokens)
  full = jax.jit(model.apply)({'params': params}, tokens)
  cache = jax.jit(functools.partial(model.init, decode=True))(
      jax.random.key(0, impl='rbg'), jnp.zeros((2, config.max_len), jnp.int32))['cache']
  step = jax.jit(functools.partial(model.apply, decode=True, mutable=['cache']))
  outputs = []
  for start, stop in chunks:
    logits, mutated = step({'params': params, 'cache': cache}, tokens[:, start:stop])
    cache = mutated['cache']
    outputs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=1e-5, rtol=1e-5)
  return model, params, full, tokens


@pytest.mark.parametrize('settings', [
    dict(mask='sliding_window', window=3),
    dict(mask='bigbird', block_size=2, window_blocks=1, global_blocks=1, random_blocks=1),
])
def test_gpt_decoding_with_a_local_mask_equals_full_forward(settings):
  model, params, full, tokens = _decode_equals_full(gpt.GPTConfig(**TINY, **settings))
  # And the mask matters: plain causal attention gives other logits.
  causal = jax.jit(gpt.GPT(gpt.GPTConfig(**TINY)).apply)({'params': params}, tokens)
  assert not np.allclose(causal, full, atol=1e-4)
  del model
