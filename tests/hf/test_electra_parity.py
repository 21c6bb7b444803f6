"""ELECTRA <-> transformers: a generator and a discriminator published as separate
directories (ElectraForMaskedLM, ElectraForPreTraining) import into one model with shared
embeddings; outputs agree both ways; export gives back the same bytes; refusals."""

import json
import string

import jax
import numpy as np
import pytest

from hf import convert
from hf import electra as hf_electra
from hf import io as hf_io
from models import electra
from tests.hf.test_bert_parity import _batch, _close, _randomise, _real

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PIECES = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list(string.ascii_lowercase)
          + ['##' + c for c in string.ascii_lowercase] + list('.,;:!?\''))
VOCAB = len(PIECES)  # 64
COMMON = dict(vocab_size=VOCAB, embedding_size=16, num_hidden_layers=2,
              max_position_embeddings=24, attn_implementation='eager')
DISCRIMINATOR = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48)
GENERATOR = dict(hidden_size=16, num_attention_heads=2, intermediate_size=24)  # 1/2


def _pair(seed: int):
  """A randomised discriminator and generator sharing their embeddings, as ELECTRA trains."""
  torch.manual_seed(seed)
  discriminator = _randomise(transformers.ElectraForPreTraining(
      transformers.ElectraConfig(**COMMON, **DISCRIMINATOR)))
  generator = _randomise(transformers.ElectraForMaskedLM(
      transformers.ElectraConfig(**COMMON, **GENERATOR)))
  generator.electra.embeddings.load_state_dict(discriminator.electra.embeddings.state_dict())
  return discriminator, generator


@pytest.fixture(scope='module')
def electra_dirs(tmp_path_factory):
  discriminator, generator = _pair(0)
  root = tmp_path_factory.mktemp('electra')
  for name, model in (('discriminator', discriminator), ('generator', generator)):
    model.save_pretrained(root / name)
    (root / name / 'vocab.txt').write_text('\n'.join(PIECES) + '\n')
  return root, discriminator, generator


def _hf(model, tokens, types, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                 attention_mask=torch.tensor(mask), output_hidden_states=True)


def _ours(cfg, params, tokens, types, mask, method):
  return jax.jit(lambda p: electra.Electra(cfg).apply(
      {'params': p}, tokens, token_types_BT=types, segment_ids_BT=mask, hidden_states=True,
      method=method))(params)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_import_matches_both_models(electra_dirs, scan_layers):
  root, discriminator, generator = electra_dirs
  imported = hf_io.load_hf_dir(root / 'discriminator', generator_dir=root / 'generator',
                               scan_layers=scan_layers)
  assert imported.family == 'electra' and imported.fresh == ()
  cfg = electra.ElectraConfig(**imported.fields)
  assert (cfg.embedding_width, cfg.generator_fraction, cfg.generator.num_heads) == (16, 0.5, 2)
  tokens, types, mask = _batch(pad_id=0, token_types=True)
  for method, model, ours_key, hf_key in (('discriminate', discriminator, 'rtd_logits', 'logits'),
                                          ('generate', generator, 'mlm_logits', 'logits')):
    ours = _ours(cfg, imported.params, tokens, types, mask, method)
    theirs = _hf(model, tokens, types, mask)
    _close(_real(ours[ours_key], mask), _real(theirs[hf_key].numpy(), mask))
    for layer, (a, b) in enumerate(zip(ours['hidden_states'][1:], theirs.hidden_states[1:])):
      _close(_real(a, mask), _real(b.numpy(), mask))


def test_export_gives_the_same_bytes_and_transformers_loads_it(electra_dirs, tmp_path):
  root, discriminator, generator = electra_dirs
  imported = hf_io.load_hf_dir(root / 'discriminator', generator_dir=root / 'generator')
  cfg = electra.ElectraConfig(**imported.fields)
  hf_electra.save_hf_dirs(tmp_path, cfg, imported.params)
  for role in hf_electra.ROLES:
    original = hf_io.read_safetensors(root / role)
    exported = hf_io.read_safetensors(tmp_path / role)
    # transformers saves the tied generator_lm_head.weight once, as the embedding table.
    original = {k: v for k, v in original.items() if k != 'generator_lm_head.weight'}
    assert sorted(original) == sorted(exported), role
    for name in original:
      assert original[name].tobytes() == exported[name].tobytes(), name
  tokens, types, mask = _batch(pad_id=0, token_types=True, seed=1)
  for cls, model in ((transformers.ElectraForPreTraining, discriminator),
                     (transformers.ElectraForMaskedLM, generator)):
    role = 'discriminator' if cls is transformers.ElectraForPreTraining else 'generator'
    loaded = cls.from_pretrained(tmp_path / role).eval()
    _close(_real(_hf(loaded, tokens, types, mask).logits.numpy(), mask),
           _real(_hf(model, tokens, types, mask).logits.numpy(), mask))
  configs = hf_electra.config_to_hf(cfg)
  assert configs['generator']['hidden_size'] == 16 and configs['generator']['embedding_size'] == 16


def test_discriminator_alone_imports_with_a_fresh_generator(electra_dirs):
  root, discriminator, _ = electra_dirs
  imported = hf_io.load_hf_dir(root / 'discriminator')
  assert imported.fresh == ('generator',)
  cfg = electra.ElectraConfig(**imported.fields)
  tokens, types, mask = _batch(pad_id=0, token_types=True)
  ours = _ours(cfg, imported.params, tokens, types, mask, 'discriminate')
  _close(_real(ours['rtd_logits'], mask),
         _real(_hf(discriminator, tokens, types, mask).logits.numpy(), mask))


def test_refusals_name_what_cannot_be_represented(electra_dirs, tmp_path):
  root, discriminator, _ = electra_dirs
  _, unshared = _pair(1)  # a generator whose embeddings are not the discriminator's
  unshared.save_pretrained(tmp_path / 'generator')
  with pytest.raises(ValueError, match='differs from the discriminator'):
    hf_io.load_hf_dir(root / 'discriminator', generator_dir=tmp_path / 'generator')
  config = json.loads((root / 'generator' / 'config.json').read_text())
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'config.json').write_text(json.dumps({**config, 'intermediate_size': 30}))
  (bad / 'model.safetensors').write_bytes((root / 'generator' / 'model.safetensors').read_bytes())
  with pytest.raises(ValueError, match='intermediate_size=30'):
    hf_io.load_hf_dir(root / 'discriminator', generator_dir=bad)
  with pytest.raises(ValueError, match='generator_dir is for ELECTRA'):
    hf_io.load_hf_dir(_bert_dir(tmp_path), generator_dir=root / 'generator')


def _bert_dir(tmp_path):
  model = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=24, max_position_embeddings=24))
  model.save_pretrained(tmp_path / 'bert')
  return tmp_path / 'bert'


@pytest.mark.slow  # ~30 s: builds the trainer's pipeline twice
def test_convert_cli_round_trip_through_a_workdir(electra_dirs, tmp_path):
  root, _, _ = electra_dirs
  result = convert.import_to_workdir(root / 'discriminator', tmp_path / 'work',
                                     generator_dir=root / 'generator')
  assert result['config'].model_name == 'electra' and result['fresh'] == ()
  files = convert.export_from_workdir(tmp_path / 'work', tmp_path / 'out')
  assert {f.parent.name for f in files} == {'discriminator', 'generator'}
  for role in hf_electra.ROLES:
    exported = hf_io.read_safetensors(tmp_path / 'out' / role)
    original = hf_io.read_safetensors(root / role)
    for name, value in exported.items():
      assert value.tobytes() == original[name].tobytes(), name
