"""ELECTRA's objective: replaced tokens, RTD metrics by hand, L_G + λ·L_D, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import objectives
from models import electra as electra_model
from objectives import electra
from objectives import masked_lm
from objectives import masking
from objectives.masking import MaskedLM


def test_replacements_are_samples_at_selected_positions_only():
  originals = jnp.array([[5, 6, 7, 8]])
  selected = jnp.array([[True, True, False, False]])
  # The generator is sure: token 9 at position 0, the original 6 at position 1.
  logits = jnp.full((1, 4, 12), -1e4).at[0, 0, 9].set(0.0).at[0, 1, 6].set(0.0)
  replaced, labels = electra.replace_tokens(jax.random.key(0), logits, originals, selected, 1.0)
  np.testing.assert_array_equal(replaced, [[9, 6, 7, 8]])
  # A sample equal to the original counts as original.
  np.testing.assert_array_equal(labels, [[True, False, False, False]])


def test_samples_follow_the_tempered_softmax():
  logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
  draws = 20000
  logits_BTV = jnp.broadcast_to(logits, (1, draws, 3))
  originals = jnp.zeros((1, draws), jnp.int32)
  for temperature in (1.0, 2.0):
    sampled, _ = electra.replace_tokens(jax.random.key(1), logits_BTV, originals,
                                        jnp.ones((1, draws), bool), temperature)
    expected = np.asarray(jax.nn.softmax(logits / temperature))
    frequencies = np.bincount(np.asarray(sampled[0]), minlength=3) / draws
    # 5 standard errors of a binomial proportion.
    error = 5 * np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(frequencies - expected) < error), (temperature, frequencies, expected)


def test_rtd_sums_by_hand():
  logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
  labels = jnp.array([[True, False, False, True]])
  weights = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
  sums = electra.rtd_sums(logits, labels, weights)
  softplus = lambda x: np.log1p(np.exp(x))
  loss = softplus(-2.0) + softplus(-1.0) + softplus(0.5)
  assert float(sums['rtd_loss_sum']) == pytest.approx(loss, rel=1e-6)
  # Predicted replaced: tokens 0 and 2; right: 0 and 1.
  assert {k: float(v) for k, v in sums.items() if k != 'rtd_loss_sum'} == {
      'rtd_correct': 2.0, 'rtd_weight': 3.0, 'rtd_replaced': 1.0, 'rtd_predicted': 2.0,
      'rtd_true_positive': 1.0}
  report = electra.rtd_report(sums)
  assert report['rtd_precision'] == 0.5 and report['rtd_recall'] == 1.0


def test_build_binds_the_recipe():
  class Tokenizer:
    mask_id, vocab_size, special_ids = 4, 50, (0, 1, 2, 3, 4)
  objective = objectives.build('electra', dict(rate=0.15, mask_fraction=0.85, random_fraction=0.0,
                                               rtd_weight=50.0), tokenizer=Tokenizer())
  assert objective.settings.rtd_weight == 50.0 and objective.settings.masking.mask_fraction == 0.85
  report = objective.summarize({'mlm_loss_sum': 6.0, 'mlm_correct': 1.0, 'mlm_weight': 3.0,
                                'rtd_loss_sum': 1.0, 'rtd_correct': 8.0, 'rtd_weight': 10.0,
                                'rtd_replaced': 2.0, 'rtd_predicted': 1.0,
                                'rtd_true_positive': 1.0})
  assert report['loss'] == pytest.approx(2.0 + 50.0 * 0.1)
  with pytest.raises(ValueError, match='temperature'):
    objectives.build('electra', dict(temperature=0.0), tokenizer=Tokenizer())


@pytest.fixture(scope='module')
def setup():
  cfg = electra_model.ElectraConfig(vocab_size=40, max_len=16, num_layers=1, num_heads=2,
                                    embed_dim=16, mlp_dim=32, generator_fraction=0.5)
  model = electra_model.Electra(cfg)
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 5, 40)
  segments = jnp.ones((4, 16), jnp.int32).at[3, 12:].set(0)
  batch = {'inputs': tokens, 'segment_ids': segments,
           'positions': jnp.broadcast_to(jnp.arange(16), (4, 16))}
  params = nn.unbox(model.init(jax.random.key(0), tokens))['params']
  settings = electra.Electra(MaskedLM(mask_id=4, vocab_size=40, special_ids=(0, 1, 2, 3, 4),
                                      rate=0.25, mask_fraction=0.85, random_fraction=0.0),
                             rtd_weight=50.0)
  return model, params, batch, settings


def test_loss_is_mlm_plus_weighted_rtd_over_real_tokens(setup):
  model, params, batch, settings = setup
  loss, sums = electra.loss_fn(params, batch, jax.random.key(3), model=model,
                               deterministic=True, settings=settings)
  assert float(sums['rtd_weight']) == 4 * 16 - 4 == float(sums['weight'])
  assert float(sums['mlm_weight']) == pytest.approx(0.25 * np.array([16, 16, 16, 12]).sum(), abs=4)
  # An untrained generator rarely guesses the original: most masked tokens get replaced.
  assert 0 < float(sums['rtd_replaced']) <= float(sums['mlm_weight'])
  report = electra.summarize(jax.device_get(sums), rtd_weight=50.0)
  assert float(loss) == pytest.approx(report['loss'], rel=1e-5)
  assert report['loss'] == pytest.approx(report['mlm_loss'] + 50.0 * report['rtd_loss'])


def test_gradients_generator_learns_from_mlm_alone_discriminator_from_rtd(setup):
  """No gradient crosses the sampling: RTD trains the discriminator (and the shared
  embeddings), never the generator; MLM trains the generator, never the discriminator.
  Descending the joint loss lowers it."""
  model, params, batch, settings = setup
  rng = jax.random.key(3)

  def part(p, name):
    return electra.loss_fn(p, batch, rng, model=model, deterministic=True,
                           settings=settings)[1][name]

  rtd_grads = jax.grad(part)(params, 'rtd_loss_sum')
  mlm_grads = jax.grad(part)(params, 'mlm_loss_sum')
  norm = lambda tree: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
  assert norm(rtd_grads['generator']) == 0.0 and norm(rtd_grads['discriminator']) > 0
  assert norm(mlm_grads['discriminator']) == 0.0 and norm(mlm_grads['generator']) > 0
  assert norm(rtd_grads['embeddings']) > 0 and norm(mlm_grads['embeddings']) > 0

  loss_of = lambda p: electra.loss_fn(p, batch, rng, model=model, deterministic=True,
                                      settings=settings)[0]
  loss, grads = jax.value_and_grad(loss_of)(params)
  stepped = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
  assert float(loss_of(stepped)) < float(loss)


def test_generator_head_at_the_selectable_slots_scores_what_all_slots_would(setup):
  """The head runs at M = ⌊rate·T⌋ + 1 < T slots; its MLM sums equal the full head's."""
  model, params, batch, settings = setup
  rng = jax.random.key(5)
  _, sums = electra.loss_fn(params, batch, rng, model=model, deterministic=True,
                            settings=settings)
  inputs, targets, weights = masked_lm.masked_inputs(batch, rng, settings.masking)
  full = model.apply({'params': params}, inputs, segment_ids_BT=batch['segment_ids'],
                     positions_BT=batch['positions'], method='generate')
  expected = masked_lm.mlm_sums(full['mlm_logits'], targets, weights)
  assert electra.prediction_slots(settings.masking, 16, static=False) == 5
  for name in ('mlm_loss_sum', 'mlm_correct', 'mlm_weight'):
    np.testing.assert_allclose(sums[name], expected[name], rtol=1e-5, err_msg=name)


def test_prediction_slots_bound_every_dynamic_selection():
  """⌊rate·n + u⌋ never exceeds M, where rate·T is whole and where it is not."""
  for rate, length in ((0.15, 128), (0.25, 16), (0.15, 20), (0.5, 7)):
    recipe = MaskedLM(mask_id=4, vocab_size=40, special_ids=(0, 1, 2, 3, 4), rate=rate)
    count = electra.prediction_slots(recipe, length, static=False)
    tokens = jax.random.randint(jax.random.key(0), (256, length), 5, 40)
    _, _, weights = jax.jit(masking.mask_tokens, static_argnums=3)(
        jax.random.key(1), tokens, jnp.ones_like(tokens), recipe)
    # Tight: at most one slot to spare (float32's rate·n can round past a whole rate·T).
    assert count - 1 <= int(weights.sum(axis=1).max()) <= count < length, (rate, length)
  whole_words = MaskedLM(mask_id=4, vocab_size=40, whole_word=True)
  assert electra.prediction_slots(whole_words, 16, static=False) == 16
  assert electra.prediction_slots(MaskedLM(mask_id=4, vocab_size=40), 16, static=True) == 16


def test_gather_slots_puts_the_selected_first_in_order():
  weights = jnp.array([[0.0, 1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
  slots, take = electra.gather_slots(weights, 3)
  np.testing.assert_array_equal(slots, [[1, 3, 4], [0, 1, 2]])
  np.testing.assert_array_equal(take(weights), [[1, 1, 1], [1, 0, 0]])
