"""DeBERTa-v2/v3 <-> transformers: parity of hidden states and MLM logits both ways (with
padding), bitwise round trips, the scanned layout, refusals, DeBERTa-v2's buckets, and our
enhanced mask decoder against Microsoft's, run on transformers' own layers.

transformers' models are built from small random configs (no downloads), every parameter
redrawn (its init leaves biases at 0 and LayerNorms at 1, which would hide a swapped bias).
The directories are written and read with safetensors directly: hf/io.py is wired to
hf/deberta.py elsewhere.
"""

import dataclasses
import json

import flax
import jax
import numpy as np
import pytest
import safetensors.numpy

from hf import deberta as hf_deberta
from models import deberta
from models import relative
from tests import tolerances

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
modeling = pytest.importorskip('transformers.models.deberta_v2.modeling_deberta_v2')

VOCAB, LENGTH, MAX_POS = 61, 16, 24
LENGTHS = (16, 11, 5)  # real tokens per row; the rest is padding
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=MAX_POS, relative_attention=True,
             share_att_key=True, attn_implementation='eager')
VARIANTS = {
    # v2/v3: no token types, no absolute positions at the input, both terms, a normalised
    # relative table; 4 buckets a side ending at distance 10, so rows of 16 tokens reach
    # the clipped buckets. transformers' default (legacy) MLM head names.
    'v3': dict(type_vocab_size=0, position_biased_input=False, pos_att_type=['c2p', 'p2c'],
               norm_rel_ebd='layer_norm', position_buckets=4, max_relative_positions=10),
    # Absolute positions and token types at the input, c2p alone (scale 1/sqrt(2H)), a raw
    # relative table, Microsoft's MLM head names, the tanh GELU.
    'biased_input': dict(type_vocab_size=2, position_biased_input=True, pos_att_type=['c2p'],
                         norm_rel_ebd='none', position_buckets=6, max_relative_positions=12,
                         legacy=False, hidden_act='gelu_new', layer_norm_eps=1e-5),
    # p2c alone, one token type, max_relative_positions from max_position_embeddings.
    'p2c': dict(type_vocab_size=1, position_biased_input=False, pos_att_type='p2c',
                norm_rel_ebd='layer_norm', position_buckets=8, max_relative_positions=-1),
}


def _randomise(model):
  """Redraws every parameter: weights and biases N(0, 0.3), LayerNorm scales 1 + N(0, 0.3)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3)
      if 'LayerNorm.weight' in name:
        p.add_(1.0)
  return model.eval()


def _hf_model(cls, variant, seed):
  torch.manual_seed(seed)
  return _randomise(cls(transformers.DebertaV2Config(**{**SMALL, **VARIANTS[variant]})))


def _save(model, path):
  model.save_pretrained(path)
  return path


def _read(path):
  """config.json and the state dict of an HF directory."""
  config = json.loads((path / 'config.json').read_text())
  return config, safetensors.numpy.load_file(str(path / 'model.safetensors'))


def _write(path, cfg, params):
  """An HF directory of our model, as hf/io.py writes one."""
  path.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(hf_deberta.params_to_hf(params, cfg),
                              str(path / 'model.safetensors'), metadata={'format': 'pt'})
  (path / 'config.json').write_text(json.dumps(hf_deberta.config_to_hf(cfg)))
  return path


def _import(path, scan_layers=False, **changes):
  hf_config, state = _read(path)
  fields = {**hf_deberta.config_from_hf(hf_config), 'scan_layers': scan_layers, **changes}
  cfg = deberta.DebertaConfig(**fields)
  params, fresh = hf_deberta.params_from_hf(state, cfg)
  return cfg, params, fresh


def _batch(seed=0):
  """tokens, token types (the second half of each row's real tokens = 1) and the padding
  mask, [3, LENGTH] each."""
  rng = np.random.default_rng(seed)
  mask = np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]
  tokens = np.where(mask, rng.integers(3, VOCAB, (len(LENGTHS), LENGTH)), 0)
  types = (np.arange(LENGTH)[None, :] >= np.array(LENGTHS)[:, None] // 2) & mask
  return tokens, types.astype(np.int64), mask.astype(np.int64)


def _hf_forward(model, tokens, types, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                 attention_mask=torch.tensor(mask), output_hidden_states=True)


def _ours(cfg, params, tokens, types, mask):
  forward = jax.jit(lambda p, x, t, s: deberta.DeBERTa(cfg).apply(
      {'params': p}, x, token_types_BT=t, segment_ids_BT=s, hidden_states=True))
  return forward(params, tokens, types, mask)


def _real(x, mask):
  """The rows of real tokens (padding's outputs are not defined alike on both sides)."""
  return np.asarray(x)[np.asarray(mask, bool)]


def _close(actual, expected):
  tolerances.assert_close(np.asarray(actual), np.asarray(expected), rtol=1e-5, scale=1e-5)


def _compare(ours, hf, mask, logits=True):
  assert len(ours['hidden_states']) == len(hf.hidden_states)
  for layer, (a, b) in enumerate(zip(ours['hidden_states'], hf.hidden_states)):
    try:
      _close(_real(a, mask), _real(b.numpy(), mask))
    except AssertionError as e:
      raise AssertionError(f'hidden state {layer}') from e
  if logits:
    _close(_real(ours['mlm_logits'], mask), _real(hf.logits.numpy(), mask))


@pytest.fixture(scope='module', params=list(VARIANTS))
def hf_dir(request, tmp_path_factory):
  variant = request.param
  seed = list(VARIANTS).index(variant)
  model = _hf_model(transformers.DebertaV2ForMaskedLM, variant, seed)
  return variant, _save(model, tmp_path_factory.mktemp(variant)), model


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize('scan_layers', [False, True])
def test_import_matches_transformers(hf_dir, scan_layers):
  variant, path, model = hf_dir
  cfg, params, fresh = _import(path, scan_layers=scan_layers)
  assert fresh == () and cfg.scan_layers == scan_layers
  assert cfg.position_biased_input == (variant == 'biased_input')
  tokens, types, mask = _batch()
  if cfg.type_vocab_size < 2:
    types = np.zeros_like(types)  # no second type in transformers' table to read them from
  ours = _ours(cfg, params, tokens, types, mask)
  _compare(ours, _hf_forward(model, tokens, types, mask), mask)


def test_bare_model_imports_with_a_fresh_mlm_head(tmp_path):
  """A DebertaV2Model checkpoint (names without the 'deberta.' prefix, no MLM head)."""
  model = _hf_model(transformers.DebertaV2Model, 'v3', 5)
  cfg, params, fresh = _import(_save(model, tmp_path))
  assert fresh == ('mlm',)
  tokens, types, mask = _batch(seed=1)
  ours = _ours(cfg, params, tokens, np.zeros_like(types), mask)
  _compare(ours, _hf_forward(model, tokens, np.zeros_like(types), mask), mask, logits=False)
  assert np.all(np.isfinite(ours['mlm_logits']))


def _bytes(state):
  return {k: (v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes()) for k, v in state.items()}


def _microsoft_names(state):
  """transformers' legacy head names -> Microsoft's, as our export writes them."""
  renames = {'cls.predictions.transform.dense.': 'lm_predictions.lm_head.dense.',
             'cls.predictions.transform.LayerNorm.': 'lm_predictions.lm_head.LayerNorm.',
             'cls.predictions.bias': 'lm_predictions.lm_head.bias'}
  renamed = {}
  for name, value in state.items():
    for old, new in renames.items():
      name = name.replace(old, new)
    renamed[name] = value
  return renamed


@pytest.mark.parametrize('scan_layers', [False, True])
def test_import_export_round_trip_is_bitwise(hf_dir, tmp_path, scan_layers):
  variant, path, _ = hf_dir
  cfg, params, _ = _import(path, scan_layers=scan_layers)
  hf_config, original = _read(path)
  exported = hf_deberta.params_to_hf(params, cfg)
  # Every array comes back byte for byte, under the names of Microsoft's MLM head.
  assert _bytes(exported) == _bytes(_microsoft_names(original))
  if variant == 'biased_input':  # legacy=False already: the very same names
    assert set(exported) == set(original)
  # The exported config maps to the same fields.
  fields = hf_deberta.config_from_hf(hf_config)
  assert hf_deberta.config_from_hf(hf_deberta.config_to_hf(cfg)) == fields
  # And back again: our tree is unchanged, in either layout.
  _write(tmp_path, cfg, params)
  _, reimported, _ = _import(tmp_path, scan_layers=scan_layers)
  assert jax.tree.map(lambda x: x.tobytes(), reimported) == jax.tree.map(
      lambda x: x.tobytes(), params)


def _our_random_params(cfg, seed):
  """Our own init with every leaf moved by N(0, 0.3), so no bias is left at 0."""
  rng = np.random.default_rng(seed)
  model = deberta.DeBERTa(dataclasses.replace(cfg, scan_layers=False))
  params = flax.core.meta.unbox(model.init(jax.random.key(seed), np.zeros((1, 1), np.int32)))
  params = jax.tree.map(lambda x: (x + rng.normal(0, 0.3, x.shape)).astype(np.float32),
                        params['params'])
  return hf_deberta.stack_layers(params, cfg.num_layers) if cfg.scan_layers else params


@pytest.mark.parametrize('variant, scan_layers', [('v3', False), ('v3', True),
                                                  ('biased_input', False)])
def test_export_loads_in_transformers_with_same_outputs(tmp_path, variant, scan_layers):
  fields = dict(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=48, vocab_size=VOCAB,
                max_len=MAX_POS, relative_buckets=8, relative_max_distance=10,
                scan_layers=scan_layers)
  if variant == 'biased_input':
    fields.update(position_biased_input=True, type_vocab_size=2, pos_att_type='p2c|c2p',
                  norm_rel_ebd='none', activation='gelu_tanh', norm_epsilon=1e-6)
  cfg = deberta.DebertaConfig(**fields)
  params = _our_random_params(cfg, 3)
  _write(tmp_path, cfg, params)
  model, info = transformers.DebertaV2ForMaskedLM.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not any(info.values()), info  # nothing missing, unexpected or mismatched
  assert model.config.legacy is False
  tokens, types, mask = _batch(seed=2)
  types = types if cfg.type_vocab_size else np.zeros_like(types)
  ours = _ours(cfg, params, tokens, types, mask)
  _compare(ours, _hf_forward(model.eval(), tokens, types, mask), mask)
  base = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation='eager').eval()
  assert isinstance(base, transformers.DebertaV2Model)
  _compare(ours, _hf_forward(base, tokens, types, mask), mask, logits=False)


def test_buckets_match_transformers():
  """Our DeBERTa-v2 buckets equal `make_log_bucket_position` (+ its clamp), jitted."""
  distances = np.arange(-1100, 1101)
  for buckets, max_relative in ((256, 512), (128, 512), (4, 8), (5, 15), (13, 26),
                                (24, 72), (4, 10), (6, 12), (8, 24), (37, 74)):
    expected = modeling.make_log_bucket_position(torch.tensor(distances), buckets,
                                                 max_relative).long().numpy()
    expected = np.clip(expected + buckets, 0, 2 * buckets - 1)
    ours = jax.jit(lambda r, b=buckets, m=max_relative: relative.deberta_v2_bucket_index(
        r, num_buckets=2 * b, max_distance=m))(distances)
    np.testing.assert_array_equal(ours, expected, err_msg=f'{buckets}, {max_relative}')


# -------------------------------------------------------------------------------- EMD


def test_emd_matches_microsofts_on_transformers_layers(hf_dir):
  """Our EMD against Microsoft's `EnhancedMaskDecoder.emd_context_layer`, run with
  transformers' last layer (which takes separate query states): 2 steps of
  I = Layer_L(h_{L-1}, query_states=I) from I = h_{L-1} + W_p[positions], then the head."""
  variant, path, model = hf_dir
  if variant == 'biased_input':
    pytest.skip('no EMD with positions at the input')
  cfg, params, fresh = _import(path, emd_layers=2)
  assert fresh == ('emd',)  # transformers' checkpoint has no position table: a fresh one
  table = np.asarray(params['position_embed']['embedding'])
  assert table.shape == (MAX_POS, 32) and 0 < table.std() < 0.05
  table = np.random.default_rng(7).normal(0, 0.3, table.shape).astype(np.float32)
  params = {**params, 'position_embed': {'embedding': table}}
  tokens, types, mask = _batch(seed=3)
  types = np.zeros_like(types)
  ours = _ours(cfg, params, tokens, types, mask)

  hf = _hf_forward(model, tokens, types, mask)
  encoder = model.deberta.encoder
  with torch.no_grad():
    kv = hf.hidden_states[-2]
    query = kv + torch.tensor(table)[None, :LENGTH]
    attention_mask = encoder.get_attention_mask(torch.tensor(mask))
    relative_pos = encoder.get_rel_pos(kv)
    for _ in range(2):
      query = encoder.layer[-1](kv, attention_mask, query_states=query,
                                relative_pos=relative_pos,
                                rel_embeddings=encoder.get_rel_embedding())[0]
    head = model.cls if hasattr(model, 'cls') else None
    logits = (head(query) if head is not None else
              model.lm_predictions(query, model.deberta.embeddings.word_embeddings))
  _close(_real(ours['hidden'], mask), _real(hf.hidden_states[-1].numpy(), mask))
  _close(_real(ours['mlm_logits'], mask), _real(logits.numpy(), mask))


def test_emd_import_takes_a_checkpoints_position_table(hf_dir):
  """v2/v3 checkpoints carry the table that their EMD used; transformers (and we without
  the EMD) skip it, our EMD takes it."""
  variant, path, _ = hf_dir
  if variant == 'biased_input':
    pytest.skip('the table is the input positions there')
  hf_config, state = _read(path)
  table = np.random.default_rng(8).normal(0, 1, (MAX_POS, 32)).astype(np.float32)
  state = {**state, 'deberta.embeddings.position_embeddings.weight': table,
           'mask_predictions.dense.weight': np.zeros((32, 32), np.float32)}
  cfg = deberta.DebertaConfig(**hf_deberta.config_from_hf(hf_config))
  params, fresh = hf_deberta.params_from_hf(state, cfg)
  assert fresh == () and 'position_embed' not in params
  emd_cfg = dataclasses.replace(cfg, emd_layers=2)
  params, fresh = hf_deberta.params_from_hf(state, emd_cfg)
  assert fresh == ()
  np.testing.assert_array_equal(params['position_embed']['embedding'], table)


def test_emd_model_exports_as_microsofts_checkpoints_are_published(tmp_path):
  """The EMD's table goes where v2/v3 checkpoints keep it and emd_layers into config.json:
  transformers loads the rest and computes our hidden states, and the logits of our model
  without the EMD (its own way with Microsoft's checkpoints); an import gets it all back."""
  cfg = deberta.DebertaConfig(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=48,
                              vocab_size=VOCAB, max_len=MAX_POS, relative_buckets=8,
                              relative_max_distance=10, emd_layers=2)
  params = _our_random_params(cfg, 4)
  _write(tmp_path, cfg, params)
  assert json.loads((tmp_path / 'config.json').read_text())['emd_layers'] == 2
  model, info = transformers.DebertaV2ForMaskedLM.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['mismatched_keys'], info
  tokens, types, mask = _batch(seed=4)
  types = np.zeros_like(types)
  plain_cfg = dataclasses.replace(cfg, emd_layers=0)
  plain = {k: v for k, v in params.items() if k != 'position_embed'}
  _compare(_ours(plain_cfg, plain, tokens, types, mask),
           _hf_forward(model.eval(), tokens, types, mask), mask)
  again_cfg, again, fresh = _import(tmp_path)
  assert again_cfg == cfg and fresh == ()
  assert jax.tree.map(lambda x: x.tobytes(), again) == jax.tree.map(lambda x: x.tobytes(), params)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize('field, value', [
    ('conv_kernel_size', 3), ('pos_att_type', ['c2p', 'p2p']), ('pos_att_type', []),
    ('share_att_key', False), ('relative_attention', False), ('position_buckets', -1),
    ('embedding_size', 16), ('attention_head_size', 4), ('norm_rel_ebd', 'rms'),
    ('model_type', 'deberta'), ('hidden_act', 'tanh'), ('attention_probs_dropout_prob', 0.3),
    ('tie_word_embeddings', False)])
def test_config_rejects_what_we_cannot_represent(field, value):
  hf = transformers.DebertaV2Config(**{**SMALL, **VARIANTS['v3']}).to_dict()
  assert deberta.DebertaConfig(**hf_deberta.config_from_hf(hf))  # the unchanged one maps
  with pytest.raises(ValueError, match=field):
    hf_deberta.config_from_hf({**hf, field: value})


def test_config_round_trips_through_hf():
  for fields in (dict(), dict(position_biased_input=True, type_vocab_size=3,
                              pos_att_type='p2c', norm_rel_ebd='none', norm_epsilon=1e-5,
                              activation='gelu_tanh', relative_buckets=10,
                              relative_max_distance=40)):
    cfg = deberta.DebertaConfig(num_layers=3, num_heads=2, embed_dim=8, mlp_dim=16,
                                vocab_size=20, max_len=40, init_stddev=0.05, dropout_rate=0.2,
                                **fields)
    assert deberta.DebertaConfig(**hf_deberta.config_from_hf(
        hf_deberta.config_to_hf(cfg))) == cfg


@pytest.mark.parametrize('field, value', [
    ('deberta_v2', False), ('share_att_key', False), ('position', 'rope'),
    ('activation', 'geglu')])
def test_export_refuses_what_transformers_cannot_run(field, value):
  cfg = deberta.DebertaConfig(num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16,
                              vocab_size=20, **{field: value})
  with pytest.raises(ValueError, match=rf'DebertaConfig\.{field}={value!r}'):
    hf_deberta.config_to_hf(cfg)


def test_unexpected_partial_and_untied_names_are_errors(hf_dir):
  variant, path, _ = hf_dir
  hf_config, state = _read(path)
  cfg = deberta.DebertaConfig(**hf_deberta.config_from_hf(hf_config))
  extra = {**state, 'deberta.encoder.layer.0.attention.self.pos_key_proj.weight':
           np.zeros((32, 32), np.float32), 'pooler.dense.weight': np.zeros((32, 32), np.float32)}
  with pytest.raises(ValueError, match=r'pooler.*pos_key_proj|pos_key_proj.*pooler'):
    hf_deberta.params_from_hf(extra, cfg)
  legacy = variant != 'biased_input'  # transformers' default head names
  head = 'cls.predictions' if legacy else 'lm_predictions.lm_head'
  partial = {k: v for k, v in state.items() if k != f'{head}.bias'}
  with pytest.raises(ValueError, match=rf'{head}.bias'):
    hf_deberta.params_from_hf(partial, cfg)
  body = {k: v for k, v in state.items() if k != 'deberta.encoder.rel_embeddings.weight'}
  with pytest.raises(ValueError, match='rel_embeddings'):
    hf_deberta.params_from_hf(body, cfg)
  words = state['deberta.embeddings.word_embeddings.weight']
  with pytest.raises(ValueError, match='cls.predictions.decoder.weight'):
    hf_deberta.params_from_hf({**state, 'cls.predictions.decoder.weight': words + 1}, cfg)
  # Saved tied copies and buffers are accepted.
  tied = {**state, 'cls.predictions.decoder.weight': words,
          'deberta.embeddings.position_ids': np.arange(MAX_POS)[None]}
  if legacy:
    tied['cls.predictions.decoder.bias'] = state['cls.predictions.bias']
  assert hf_deberta.params_from_hf(tied, cfg)[1] == ()
  with pytest.raises(ValueError, match='relative_embed'):
    hf_deberta.params_from_hf(state, dataclasses.replace(
        cfg, relative_buckets=cfg.relative_buckets + 2))
