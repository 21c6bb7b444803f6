"""ELECTRA: two BERT encoders over one shared embedding module, and the discriminator as a
plain BERT for fine-tuning."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import bert
from models import electra
from tests.tolerances import assert_close

TINY = dict(vocab_size=50, max_len=16, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64)


@pytest.fixture(scope='module')
def tiny():
  cfg = electra.ElectraConfig(**TINY, embedding_size=16, generator_fraction=0.25)
  model = electra.Electra(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 5, 50)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))['params']
  return cfg, model, params, tokens


def test_generator_is_a_fraction_of_the_discriminator():
  cfg = electra.ElectraConfig(**TINY, generator_fraction=0.5)
  assert (cfg.generator.embed_dim, cfg.generator.mlp_dim, cfg.generator.num_heads) == (16, 32, 2)
  assert cfg.generator.head_dim == cfg.discriminator.head_dim == 8
  assert cfg.generator.num_layers == 2
  assert electra.ElectraConfig(**TINY, generator_num_layers=1).generator.num_layers == 1
  assert cfg.generator.mlm_head and not cfg.discriminator.mlm_head
  assert cfg.generator.embedding_width == cfg.discriminator.embedding_width == 32


@pytest.mark.parametrize('field, value, message', [
    ('generator_fraction', 0.0, 'ElectraConfig.generator_fraction must lie in'),
    ('generator_fraction', 0.3, 'not a whole multiple'),
    ('next_sentence', True, 'ElectraConfig.next_sentence must be False'),
])
def test_bad_configs_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    electra.ElectraConfig(**{**TINY, field: value})


def test_one_embedding_module_is_shared(tiny):
  cfg, model, params, tokens = tiny
  assert sorted(params) == ['discriminator', 'embeddings', 'generator', 'rtd_dense', 'rtd_out']
  assert params['embeddings']['token_embed']['embedding'].shape == (50, 16)
  for encoder in ('generator', 'discriminator'):
    assert not {'token_embed', 'position_embed', 'type_embed', 'ln_embed'} & set(params[encoder])
    # E = 16 differs from both widths (8 and 32): each projects it to its own.
    assert params[encoder]['embed_project']['kernel'].shape[0] == 16
  # Both encoders read the shared table: each one's output depends on it.
  for method, output in (('generate', 'mlm_logits'), ('discriminate', 'rtd_logits')):
    def total(table, method=method, output=output):
      p = {**params, 'embeddings': {**params['embeddings'], 'token_embed': {'embedding': table}}}
      return model.apply({'params': p}, tokens, method=method)[output].sum()
    grad = jax.grad(total)(params['embeddings']['token_embed']['embedding'])
    assert np.abs(grad[tokens[0, 0]]).max() > 0, method


def test_outputs(tiny):
  cfg, model, params, tokens = tiny
  out = model.apply({'params': params}, tokens)
  assert out['rtd_logits'].shape == (2, 8) and out['rtd_logits'].dtype == jnp.float32
  assert out['mlm_logits'].shape == (2, 8, 50) and out['hidden'].shape == (2, 8, 32)
  generated = model.apply({'params': params}, tokens, method='generate')
  assert generated['hidden'].shape == (2, 8, 8)
  np.testing.assert_array_equal(generated['mlm_logits'], out['mlm_logits'])


def test_discriminator_params_are_a_plain_berts(tiny):
  """What fine-tuning takes: the discriminator as a BERT tree gives the same encoding."""
  cfg, model, params, tokens = tiny
  segments = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  ours = model.apply({'params': params}, tokens, segment_ids_BT=segments, method='discriminate')
  encoder = bert.BERT(cfg.discriminator)
  plain = encoder.apply({'params': electra.discriminator_params(params)}, tokens,
                        segment_ids_BT=segments)
  assert 'mlm_logits' not in plain
  np.testing.assert_array_equal(plain['hidden'], ours['hidden'])
  # And the tree is exactly what a BERT of that config initialises (nothing missing).
  fresh = nn.unbox(encoder.init(jax.random.key(0), tokens))['params']
  assert jax.tree.structure(fresh) == jax.tree.structure(electra.discriminator_params(params))


def test_bert_with_a_narrower_embedding_projects_and_ties_its_mlm_head():
  cfg = bert.BertConfig(**TINY, embedding_size=8)
  model = bert.BERT(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 5, 50)
  params = nn.unbox(model.init(jax.random.key(0), tokens))['params']
  assert params['token_embed']['embedding'].shape == (50, 8)
  assert params['embed_project']['kernel'].shape == (8, 32)
  assert params['mlm_dense']['kernel'].shape == (32, 8)
  # The head scores against the token table: moving one row moves that logit alone.
  table = params['token_embed']['embedding']
  moved = {**params, 'token_embed': {'embedding': table.at[3].add(1.0)}}
  logits = model.apply({'params': moved}, tokens[:, :1] * 0 + 7)['mlm_logits']
  base = model.apply({'params': params}, tokens[:, :1] * 0 + 7)['mlm_logits']
  changed = np.flatnonzero(np.abs(np.asarray(logits - base)).max(axis=(0, 1)) > 0)
  np.testing.assert_array_equal(changed, [3])


def test_scanned_layers_give_the_unrolled_outputs(tiny):
  """scan_layers (and remat) keep one parameter tree per encoder, stacked over layers."""
  from hf import bert as hf_bert  # the restacking the importer uses
  cfg, model, params, tokens = tiny
  scanned = electra.Electra(dataclasses.replace(cfg, scan_layers=True, remat='full'))
  stacked = {**params, **{name: hf_bert.stack_layers(params[name], cfg.num_layers)
                          for name in ('generator', 'discriminator')}}
  expected = model.apply({'params': params}, tokens)
  actual = scanned.apply({'params': stacked}, tokens)
  for name in ('rtd_logits', 'mlm_logits', 'hidden'):
    assert_close(actual[name], expected[name])
