"""T5 and BART pretraining end to end: the configs build, train a few steps on the
corpus's corrupted text, and checkpoint; the architecture presets are what they claim."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bart as bart_config
from configs import t5 as t5_config
from data import denoising_data
from models import encoder_decoder
from training import loop


def _short(config, steps=3):
  config.unlock()
  config.train.update(num_steps=steps, eval_every=steps, checkpoint_every=steps,
                      eval_batches=1, log_every=1)
  config.lock()
  return config


@pytest.mark.parametrize('arg', ['size=tiny,version=1.0', 'size=tiny,objective=prefix_lm',
                                 'size=tiny,objective=mlm_denoising'])
def test_t5_configs_build_their_objective(arg):
  config = t5_config.get_config(arg)
  exp = loop.build(config)
  # The model's vocabulary holds the sentinels above the tokenizer's.
  assert exp.model.config.vocab_size == exp.tokenizer.vocab_size + t5_config.EXTRA_IDS
  task = loop.pair_task(exp.data, exp.tokenizer)
  assert type(task.corruption).__name__.lower().startswith(
      config.data.task.replace('_', '')[:6])


@pytest.mark.parametrize('name', [
    't5',
    # BART's rows (tests/data/test_denoising_data.py) and model (tests/hf/test_bart_parity.py)
    # are checked apart; the whole run costs another minute of the default suite.
    pytest.param('bart', marks=pytest.mark.slow)])
def test_pretraining_runs_and_checkpoints(name, tmp_path):
  config = {'t5': t5_config, 'bart': bart_config}[name].get_config('size=tiny')
  report = loop.train_and_evaluate(_short(config), str(tmp_path / name))
  assert np.isfinite(report['loss']) and report['tokens'] > 0
  assert loop.checkpoint.manager(str(tmp_path / name / 'checkpoints'),
                                 async_save=False).latest_step() == 3


def _forward(fields, rng):
  cfg = encoder_decoder.EncoderDecoderConfig(
      vocab_size=40, max_len=16, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16, **fields)
  model = encoder_decoder.EncoderDecoder(cfg)
  inputs = jax.random.randint(rng, (2, 6), 1, 40)
  return model, nn.meta.unbox(model.init(rng, inputs)), inputs


def test_t5_v1_0_rescales_its_tied_output():
  # logits = (D^-1/2 · s) Eᵀ: doubling D^-1/2's place would double the logits, so compare
  # against the same model with the scaling off.
  fields = t5_config.t5_model('1.0')
  model, variables, inputs = _forward(fields, jax.random.key(0))
  unscaled, _, _ = _forward({**fields, 'scale_tied_output': False}, jax.random.key(0))
  np.testing.assert_allclose(model.apply(variables, inputs),
                             unscaled.apply(variables, inputs) * 8 ** -0.5, rtol=1e-5,
                             atol=1e-6)


def test_bart_normalises_each_sides_embeddings():
  fields = bart_config.bart_model()
  model, variables, inputs = _forward(fields, jax.random.key(1))
  params = variables['params']
  assert {'ln_embed', 'position_embed'} <= set(params['encoder']) and \
      {'ln_embed', 'position_embed'} <= set(params['decoder'])
  # The norm acts: a shift of its bias moves the logits.
  moved = jax.tree_util.tree_map(lambda x: x, params)  # a copy of the nested dicts
  moved['encoder']['ln_embed']['bias'] = params['encoder']['ln_embed']['bias'] + 1.0
  assert not jnp.allclose(model.apply({'params': moved}, inputs),
                          model.apply(variables, inputs))


def test_sentence_ends_of_the_real_tokenizer():
  exp = loop.build(bart_config.get_config('size=tiny'))
  ends = denoising_data.sentence_end_ids(exp.tokenizer)
  assert ends and all(exp.tokenizer.decode([i]).rstrip()[-1] in '.!?' for i in ends)
