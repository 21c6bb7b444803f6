"""Every config file loads at every size and builds its model (shapes only, no memory)."""

import dataclasses
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

import models

CONFIG_FILES = sorted(p for p in glob.glob('configs/*.py') if not p.endswith('common.py'))


def _sizes(path):
  module = importlib.import_module(f'configs.{os.path.basename(path)[:-3]}')
  return [(module, size) for size in getattr(module, 'SIZES', {'': None})]


@pytest.mark.parametrize('module, size', [c for p in CONFIG_FILES for c in _sizes(p)],
                         ids=lambda x: getattr(x, '__name__', x))
def test_config_builds_its_model(module, size):
  config = module.get_config(f'size={size}' if size else None)
  assert config.is_locked
  config_cls, model_cls = models.get(config.model_name)
  # Every hyperparameter is in the config, so every one can be set from the command line.
  assert set(config.model) == {f.name for f in dataclasses.fields(config_cls)}
  model = model_cls(config_cls(**config.model))
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
  # A prefix LM's mask needs one prefix length per row.
  prefix = ({'prefix_lengths_B': jnp.ones((1,), jnp.int32)}
            if config.model.get('mask') == 'prefix_lm' else {})
  variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, **prefix), tokens)
  outputs = jax.eval_shape(lambda v, t: model.apply(v, t, **prefix), variables, tokens)
  if not isinstance(outputs, dict):  # a language model: next-token logits
    outputs = {'mlm_logits': outputs}
  if 'logits' in outputs:  # a classifier
    assert outputs['logits'].shape == (1, config.model.num_labels)
  else:
    assert outputs['mlm_logits'].shape == (1, config.data.seq_len, config.model.vocab_size)


def test_config_files_are_found():
  assert 'configs/gpt.py' in CONFIG_FILES


def test_bad_config_arguments_name_the_key():
  from configs import gpt
  with pytest.raises(ValueError, match="unknown config argument 'sise'"):
    gpt.get_config('sise=tiny')
  with pytest.raises(ValueError, match="unknown size 'huge'"):
    gpt.get_config('size=huge')
  config = gpt.get_config('size=tiny')
  with pytest.raises(AttributeError, match='num_stepz'):
    config.train.num_stepz = 3
  with pytest.raises(TypeError):
    config.train.num_steps = 'many'
