"""T5 v1.0 and v1.1 <-> transformers' T5ForConditionalGeneration: teacher-forced logits,
greedy decoding token for token, round trips both ways, refusals.

transformers' models are built from small random configs (no downloads), every parameter
redrawn (its init leaves the RMSNorm scales at 1, which would hide a swapped norm).
transformers 5 ties T5's lm_head to the token table whatever the config says (it unties
only when loading a checkpoint whose lm_head differs), so a v1.1 model is untied here by
hand. Special ids as T5's: pad 0 (also where decoding starts), EOS 1.
"""

import dataclasses
import functools

import flax
import jax
import numpy as np
import pytest

from hf import io as hf_io
from hf import t5 as hf_t5
from models import encoder_decoder
from models import seq2seq_decoding
from tests import tolerances

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 100
PAD, EOS = 0, 1
SOURCE_LENGTHS = (24, 13, 5)  # real tokens per row (the last one EOS); then padding
TARGET_LENGTH = 26  # past relative_attention_max_distance: the log buckets' far end
SMALL = dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_heads=2, num_layers=2,
             num_decoder_layers=3, relative_attention_num_buckets=8,
             relative_attention_max_distance=20, dropout_rate=0.0, pad_token_id=PAD,
             eos_token_id=EOS, decoder_start_token_id=PAD)
VERSIONS = {'v1.0': dict(feed_forward_proj='relu', tie_word_embeddings=True),
            'v1.1': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False)}


def _hf_config(version, **overrides):
  return transformers.T5Config(**{**SMALL, **VERSIONS[version], **overrides},
                               attn_implementation='eager')


def _randomise(model, gain=1.0, eos_boost=1.0):
  """Redraws every parameter: matrices N(0, gain² / fan_in), the token table and lm_head
  N(0, 1) (T5's own), RMSNorm scales 1 + N(0, 0.2²), relative biases N(0, 1). `eos_boost`
  scales EOS's row of the output table (decoding then ends sometimes before its limit)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.normal_(1.0, 0.2)
      elif 'relative_attention_bias' in name or name in ('shared.weight', 'lm_head.weight'):
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, gain / p.shape[1] ** 0.5)
    model.lm_head.weight[EOS] *= eos_boost
  return model.eval()


@functools.cache  # one model per setting, shared by the tests (none changes it)
def _hf_model(version, seed=1, **kwargs):
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(_hf_config(version))
  if version == 'v1.1':  # untie (see the module docstring), then redraw both
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  model = _randomise(model, **kwargs)
  assert (model.lm_head.weight is model.shared.weight) == (version == 'v1.0')
  return model


def _state(model):
  """Everything state_dict() holds, the embed_tokens copies included."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _import(model, scan_layers=False):
  cfg = encoder_decoder.EncoderDecoderConfig(
      **hf_t5.config_fields(model.config), scan_layers=scan_layers)
  return cfg, hf_t5.params_from_hf(_state(model), cfg)


def _sources(seed=0, lengths=SOURCE_LENGTHS):
  """[B, S] source ids ending in EOS, right-padded with PAD, and the padding mask."""
  rng = np.random.default_rng(seed)
  length = max(lengths)
  tokens = rng.integers(2, VOCAB, (len(lengths), length))
  mask = np.arange(length)[None] < np.array(lengths)[:, None]
  tokens[np.arange(len(lengths)), np.array(lengths) - 1] = EOS
  return np.where(mask, tokens, PAD), mask.astype(np.int64)


def _decoder_inputs(seed=1):
  """Teacher forcing's decoder inputs: PAD (T5's start) then random targets."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, VOCAB, (len(SOURCE_LENGTHS), TARGET_LENGTH - 1))
  return np.concatenate([np.full((len(SOURCE_LENGTHS), 1), PAD), targets], axis=1)


def _close(actual, expected):
  tolerances.assert_close(np.asarray(actual), np.asarray(expected), rtol=1e-5, scale=1e-5)


@functools.cache  # compiled once per config, for every test that runs it
def _forward(cfg):
  """(logits, the encoding) of our model, jitted."""
  model = encoder_decoder.EncoderDecoder(cfg)

  def forward(params, tokens, mask, decoder_inputs):
    logits = model.apply({'params': params}, tokens, decoder_inputs,
                         inputs_segment_ids_BS=mask)
    encoded = model.apply({'params': params}, tokens, segment_ids_BS=mask, method='encode')
    return logits, encoded['hidden']
  return jax.jit(forward)


def _logits(cfg, params, tokens, mask, decoder_inputs):
  return _forward(cfg)(params, tokens, mask, decoder_inputs)[0]


def _hf_logits(model, tokens, mask, decoder_inputs):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def _bytes(tree):
  return jax.tree.map(lambda x: (np.asarray(x).dtype.str, np.asarray(x).shape,
                                 np.ascontiguousarray(x).tobytes()), tree)


# ------------------------------------------------------------------- teacher forcing


# Unrolled and scanned layers, one version each (the export test runs the same pairs).
SCAN_LAYERS = {'v1.0': False, 'v1.1': True}


@pytest.mark.parametrize('version', ['v1.0', 'v1.1'])
def test_teacher_forced_logits_match_transformers(version):
  scan_layers = SCAN_LAYERS[version]
  model = _hf_model(version)
  cfg, params = _import(model, scan_layers)
  expected_fields = dict(
      norm='rms', norm_epsilon=1e-6, use_bias=False, attention='dot', position='t5',
      relative_buckets=8, relative_max_distance=20, num_layers=2, num_decoder_layers=3,
      scale_embeddings=False, tie_output=version == 'v1.0',
      scale_tied_output=version == 'v1.0', scan_layers=scan_layers,
      activation='relu' if version == 'v1.0' else 'geglu_tanh')
  assert {k: getattr(cfg, k) for k in expected_fields} == expected_fields
  tokens, mask = _sources()
  assert not mask.all()  # padded sources: HF's attention_mask, our segment ids
  decoder_inputs = _decoder_inputs()
  logits, hidden = _forward(cfg)(params, tokens, mask, decoder_inputs)
  _close(logits, _hf_logits(model, tokens, mask, decoder_inputs))
  # The encoding too, at the real source tokens.
  with torch.no_grad():
    hf_encoded = model.encoder(input_ids=torch.tensor(tokens),
                               attention_mask=torch.tensor(mask)).last_hidden_state
  real = mask.astype(bool)
  _close(np.asarray(hidden)[real], hf_encoded.numpy()[real])


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize('version, scan_layers', [('v1.0', True), ('v1.1', False)])
def test_import_export_round_trips_are_bitwise(tmp_path, version, scan_layers):
  model = _hf_model(version)
  state = _state(model)
  cfg, params = _import(model, scan_layers)
  # HF -> ours -> HF: every array save_pretrained writes, byte for byte.
  exported = hf_t5.params_to_hf(params, cfg)
  model.save_pretrained(tmp_path / 'hf')
  saved = hf_io.read_safetensors(tmp_path / 'hf')
  assert set(exported) == set(saved)
  assert ('lm_head.weight' in exported) == (version == 'v1.1')
  assert _bytes(exported) == _bytes({k: state[k] for k in exported})
  # A save_pretrained directory imports to the same tree as the full state dict.
  fields, from_dir, ids = hf_t5.load_hf_dir(tmp_path / 'hf', scan_layers=scan_layers)
  assert encoder_decoder.EncoderDecoderConfig(**fields) == cfg
  assert ids == dict(bos_id=PAD, eos_id=EOS, pad_id=PAD)
  assert _bytes(from_dir) == _bytes(params)
  # ours -> a directory -> ours.
  hf_t5.save_hf_dir(tmp_path / 'ours', cfg, params, **ids)
  fields, again, ids_again = hf_t5.load_hf_dir(tmp_path / 'ours', scan_layers=scan_layers)
  assert encoder_decoder.EncoderDecoderConfig(**fields) == cfg and ids_again == ids
  assert _bytes(again) == _bytes(params)


def _our_random_params(cfg, seed):
  """Random params of our tree's shapes: matrices N(0, 1/fan_in), tables N(0, 1), norm
  scales 1 + N(0, 0.2²)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, s in hf_t5.expected_shapes(cfg).items():
    if path.endswith('/scale'):
      flat[path] = rng.normal(1.0, 0.2, s.shape)
    elif path.endswith('/embedding'):
      flat[path] = rng.normal(0.0, 1.0, s.shape)
    else:  # kernels: fan_in is every axis but the output's (attention out: N and H)
      fan_in = np.prod(s.shape[:2] if path.endswith('out/kernel') else s.shape[:1])
      flat[path] = rng.normal(0.0, fan_in ** -0.5, s.shape)
  flat = {k: v.astype(np.float32) for k, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  return hf_t5.stack_layers(params) if cfg.scan_layers else params


@pytest.mark.parametrize('version', ['v1.0', 'v1.1'])
def test_our_export_loads_in_transformers_with_same_logits(tmp_path, version):
  cfg = encoder_decoder.EncoderDecoderConfig(
      **hf_t5.config_fields(_hf_config(version)), scan_layers=SCAN_LAYERS[version])
  params = _our_random_params(cfg, 3)
  tokens, mask = _sources(seed=2)
  decoder_inputs = _decoder_inputs(seed=3)
  ours = _logits(cfg, params, tokens, mask, decoder_inputs)
  # The state dict into a model built from our config.json.
  model = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**hf_t5.config_to_hf(cfg), attn_implementation='eager'))
  if not cfg.tie_output:
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  state = {k: torch.from_numpy(v) for k, v in hf_t5.params_to_hf(params, cfg).items()}
  result = model.load_state_dict(state, strict=False)
  assert not result.unexpected_keys
  assert set(result.missing_keys) <= {'encoder.embed_tokens.weight',
                                      'decoder.embed_tokens.weight', 'lm_head.weight'}
  _close(ours, _hf_logits(model.eval(), tokens, mask, decoder_inputs))
  # A directory loaded offline by from_pretrained.
  hf_t5.save_hf_dir(tmp_path, cfg, params)
  model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert (model.lm_head.weight is model.shared.weight) == cfg.tie_output
  _close(ours, _hf_logits(model.eval(), tokens, mask, decoder_inputs))


# --------------------------------------------------------------------------- decoding


MAX_NEW = 12


@pytest.mark.parametrize('version, scan_layers', [('v1.0', True), ('v1.1', False)])
def test_greedy_decoding_matches_generate_token_for_token(version, scan_layers):
  model = _hf_model(version, seed=8, gain=3.0, eos_boost=2.0)
  cfg, params = _import(model, scan_layers)
  lengths = (9, 8, 7, 6, 5, 4, 3, 2)
  tokens, mask = _sources(seed=4, lengths=lengths)
  out, _ = seq2seq_decoding.translate(
      encoder_decoder.EncoderDecoder(cfg), params, tokens, segment_ids_BS=mask,
      max_len=MAX_NEW, sampler='greedy', **hf_t5.special_ids(model.config))
  # transformers 5 sizes generate's default cache by num_layers (the encoder's), too few
  # for more decoder layers: a cache without a config grows as the layers ask.
  cache = transformers.EncoderDecoderCache(transformers.DynamicCache(),
                                           transformers.DynamicCache())
  with torch.no_grad():
    sequences = model.generate(input_ids=torch.tensor(tokens),
                               attention_mask=torch.tensor(mask), max_new_tokens=MAX_NEW,
                               do_sample=False, num_beams=1, cache=cache).numpy()
  assert (sequences[:, 0] == PAD).all()  # decoder_start_token_id
  expected = np.full((len(lengths), MAX_NEW), PAD)
  expected[:, :sequences.shape[1] - 1] = sequences[:, 1:]
  np.testing.assert_array_equal(np.asarray(out)[:, 0], expected)
  # Not all EOS: rows that end after some tokens, rows that run to the limit, and one
  # that changes token 5 times.
  ends = [list(row).index(EOS) if EOS in row else MAX_NEW for row in expected]
  assert MAX_NEW in ends and any(0 < end < MAX_NEW for end in ends), ends
  assert max((row[1:] != row[:-1]).sum() for row in expected) >= 5, expected


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize('field, value', [
    ('d_kv', 8), ('feed_forward_proj', 'gated-tanh'), ('feed_forward_proj', 'swiglu'),
    ('model_type', 'bart'), ('relative_attention_num_buckets', 2), ('is_decoder', True)])
def test_config_rejects_what_we_cannot_represent(field, value):
  hf = _hf_config('v1.1').to_dict()
  assert encoder_decoder.EncoderDecoderConfig(**hf_t5.config_fields(hf))
  with pytest.raises(ValueError, match=f'HF config {field}='):
    hf_t5.config_fields({**hf, field: value})


@pytest.mark.parametrize('version', ['v1.0', 'v1.1'])
def test_config_round_trips_and_export_refuses_other_blocks(version):
  cfg = encoder_decoder.EncoderDecoderConfig(**{
      **hf_t5.config_fields(_hf_config(version), max_len=64), 'num_layers': 3,
      'num_decoder_layers': 1, 'dropout_rate': 0.2, 'norm_epsilon': 1e-5})
  hf = hf_t5.config_to_hf(cfg, bos_id=2, eos_id=3, pad_id=4)
  assert encoder_decoder.EncoderDecoderConfig(**hf_t5.config_fields(hf, max_len=64)) == cfg
  assert hf_t5.special_ids(hf) == dict(bos_id=2, eos_id=3, pad_id=4)
  # Without a decoder_start_token_id T5 starts from pad; one EOS only.
  assert hf_t5.special_ids({**hf, 'decoder_start_token_id': None})['bos_id'] == 4
  with pytest.raises(ValueError, match='eos_token_id'):
    hf_t5.special_ids({**hf, 'eos_token_id': [1, 3]})
  # transformers reads it back as the same config, and through its to_dict() too.
  hf_config = transformers.T5Config(**hf)
  assert hf_config.num_decoder_layers == 1 and hf_config.scale_decoder_outputs == (
      version == 'v1.0')
  assert encoder_decoder.EncoderDecoderConfig(
      **hf_t5.config_fields(hf_config, max_len=64)) == cfg
  for field, value in (('norm', 'layer'), ('attention', 'scaled_dot'),
                       ('position', 'learned'), ('use_bias', True),
                       ('scale_embeddings', True), ('activation', 'geglu')):
    with pytest.raises(ValueError, match=f'EncoderDecoderConfig.{field}'):
      hf_t5.config_to_hf(dataclasses.replace(cfg, **{field: value}))
  with pytest.raises(ValueError, match='EncoderDecoderConfig.scale_tied_output'):
    hf_t5.config_to_hf(dataclasses.replace(cfg, tie_output=True, scale_tied_output=False))


def test_state_dicts_with_what_ours_cannot_hold_are_refused():
  model = _hf_model('v1.0')
  state = _state(model)
  cfg, params = _import(model)
  untied = {**state, 'lm_head.weight': state['lm_head.weight'] + 1}
  with pytest.raises(ValueError, match='lm_head.weight differs from shared.weight'):
    hf_t5.params_from_hf(untied, cfg)
  other_table = {**state, 'decoder.embed_tokens.weight': state['shared.weight'] + 1}
  with pytest.raises(ValueError, match='decoder.embed_tokens.weight differs'):
    hf_t5.params_from_hf(other_table, cfg)
  extra = {**state, 'decoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight':
           np.zeros((8, 2), np.float32)}
  with pytest.raises(ValueError, match='block.1.layer.0.SelfAttention.relative_attention_bias'):
    hf_t5.params_from_hf(extra, cfg)
  missing = {k: v for k, v in state.items()
             if k != 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'}
  with pytest.raises(ValueError, match='encoder.block.0.layer.0.SelfAttention.relative'):
    hf_t5.params_from_hf(missing, cfg)
  # The cross-attention bias old checkpoints carry (unused by T5) is dropped; a bare
  # T5Model (no lm_head) imports the same.
  unused = {**state, 'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight':
            np.ones((8, 2), np.float32)}
  assert _bytes(hf_t5.params_from_hf(unused, cfg)) == _bytes(params)
  bare = {k: v for k, v in state.items() if k != 'lm_head.weight'}
  assert _bytes(hf_t5.params_from_hf(bare, cfg)) == _bytes(params)
  # v1.1 without an lm_head.weight: transformers ties it to the table, so do we.
  cfg11 = encoder_decoder.EncoderDecoderConfig(**hf_t5.config_fields(_hf_config('v1.1')))
  cfg11 = dataclasses.replace(cfg11, activation='relu')  # v1.0's MLP names, v1.1's output
  tied = hf_t5.params_from_hf(bare, cfg11)
  np.testing.assert_array_equal(tied['decoder']['output']['kernel'], state['shared.weight'].T)
