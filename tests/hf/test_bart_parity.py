"""BART <-> transformers' BartForConditionalGeneration: teacher-forced logits, greedy
decoding token for token, round trips both ways (bitwise, the position tables' two unread
rows aside), refusals.

transformers' models are built from small random configs (no downloads), every parameter
redrawn (its init leaves biases at 0 and LayerNorms at 1, which would hide a swapped bias
or a missing embedding norm), the position tables included. Special ids as BART's: <s> 0,
pad 1, EOS 2, decoding starts from EOS; sources are <s> ... </s> then padding.
"""

import dataclasses

import flax
import jax
import numpy as np
import pytest

from hf import bart as hf_bart
from hf import io as hf_io
from models import encoder_decoder
from models import seq2seq_decoding
from tests import tolerances

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB, MAX_POS = 100, 40
BOS, PAD, EOS = 0, 1, 2
SOURCE_LENGTHS = (9, 6, 3)  # real tokens per source row (<s> first, </s> last); then padding
TARGET_LENGTH = 7
SMALL = dict(vocab_size=VOCAB, d_model=32, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
             max_position_embeddings=MAX_POS, dropout=0.0, attention_dropout=0.0,
             activation_dropout=0.0, forced_eos_token_id=None)


def _randomise(model, eos_boost: float = 1.0, gain: float | None = None):
  """Redraws every parameter: N(0, 0.3), LayerNorm scales 1 + N(0, 0.3); or with `gain`,
  matrices N(0, gain² / fan_in), biases N(0, 0.05²), scales 1 + N(0, 0.1²), and the
  tables N(0, 1) (greedy paths then change token more often). `eos_boost` scales EOS's
  row of the shared table (decoding then ends sometimes before its limit)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = 'norm' in name and name.endswith('weight')
      if gain is None:
        p.normal_(0.0, 0.3)
        p.add_(1.0 if is_scale else 0.0)
      elif is_scale:
        p.normal_(1.0, 0.1)
      elif 'shared' in name or 'embed_positions' in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 0.05 if p.dim() == 1 else gain / p.shape[1] ** 0.5)
    model.model.shared.weight[EOS] *= eos_boost
  return model.eval()


def _hf_model(seed, encoder_layers=2, decoder_layers=3, eos_boost=1.0, gain=None,
              **overrides):
  torch.manual_seed(seed)
  config = transformers.BartConfig(**{**SMALL, **overrides}, encoder_layers=encoder_layers,
                                   decoder_layers=decoder_layers,
                                   attn_implementation='eager')
  model = transformers.BartForConditionalGeneration(config)
  assert model.lm_head.weight is model.model.shared.weight  # tied, so redrawn together
  return _randomise(model, eos_boost, gain)


def _state(model):
  """Everything state_dict() holds: tied copies and final_logits_bias too."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _import(model, scan_layers=False):
  cfg = encoder_decoder.EncoderDecoderConfig(
      **hf_bart.config_fields(model.config), scan_layers=scan_layers)
  return cfg, hf_bart.params_from_hf(_state(model), cfg)


def _sources(seed=0, lengths=SOURCE_LENGTHS):
  """[B, max(lengths)] source ids <s> ... </s>, right-padded with PAD, and the padding
  mask (our source segment ids)."""
  rng = np.random.default_rng(seed)
  length = max(lengths)
  tokens = rng.integers(EOS + 1, VOCAB, (len(lengths), length))
  tokens[:, 0] = BOS
  mask = np.arange(length)[None] < np.array(lengths)[:, None]
  tokens[np.arange(len(lengths)), np.array(lengths) - 1] = EOS
  return np.where(mask, tokens, PAD), mask.astype(np.int64)


def _decoder_inputs(seed=1):
  """Teacher forcing's decoder inputs as BART shifts its labels: EOS (the start), <s>,
  then random targets."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(EOS + 1, VOCAB, (len(SOURCE_LENGTHS), TARGET_LENGTH - 2))
  starts = np.tile([[EOS, BOS]], (len(SOURCE_LENGTHS), 1))
  return np.concatenate([starts, targets], axis=1)


def _close(actual, expected):
  tolerances.assert_close(np.asarray(actual), np.asarray(expected), rtol=1e-5, scale=1e-5)


def _logits(cfg, params, tokens, mask, decoder_inputs):
  forward = jax.jit(lambda p, x, s, y: encoder_decoder.EncoderDecoder(cfg).apply(
      {'params': p}, x, y, inputs_segment_ids_BS=s))
  return forward(params, tokens, mask, decoder_inputs)


def _hf_logits(model, tokens, mask, decoder_inputs):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


# ------------------------------------------------------------------- teacher forcing


@pytest.mark.parametrize('scan_layers, overrides', [
    (False, dict(activation_function='gelu')),
    (True, dict(activation_function='gelu_new', scale_embedding=True)),
])
def test_teacher_forced_logits_match_transformers(scan_layers, overrides):
  model = _hf_model(len(overrides) + scan_layers, **overrides)
  cfg, params = _import(model, scan_layers)
  assert (cfg.num_layers, cfg.num_decoder_layers, cfg.scan_layers) == (2, 3, scan_layers)
  assert cfg.embed_norm and cfg.position == 'learned' and cfg.max_len == MAX_POS
  tokens, mask = _sources()
  assert not mask.all()  # padded sources: HF's attention_mask, our segment ids
  decoder_inputs = _decoder_inputs()
  _close(_logits(cfg, params, tokens, mask, decoder_inputs),
         _hf_logits(model, tokens, mask, decoder_inputs))
  # The encoding too, at the real source tokens.
  encoded = jax.jit(lambda p, x, s: encoder_decoder.EncoderDecoder(cfg).apply(
      {'params': p}, x, segment_ids_BS=s, method='encode'))(params, tokens, mask)
  with torch.no_grad():
    hf_encoded = model.model.encoder(input_ids=torch.tensor(tokens),
                                     attention_mask=torch.tensor(mask)).last_hidden_state
  real = mask.astype(bool)
  _close(np.asarray(encoded['hidden'])[real], hf_encoded.numpy()[real])


# ------------------------------------------------------------------------ round trips


def _bytes(tree):
  return jax.tree.map(lambda x: (np.asarray(x).dtype.str, np.asarray(x).shape,
                                 np.ascontiguousarray(x).tobytes()), tree)


POSITION_TABLES = ('model.encoder.embed_positions.weight',
                   'model.decoder.embed_positions.weight')


@pytest.mark.parametrize('scan_layers', [False, True])
def test_import_export_round_trips(tmp_path, scan_layers):
  model = _hf_model(5, 2, 3)
  state = _state(model)
  cfg, params = _import(model, scan_layers)
  # The position tables: ours holds rows 2.. (position p at row p).
  np.testing.assert_array_equal(
      flax.traverse_util.flatten_dict(params, sep='/')['decoder/position_embed/embedding'],
      state['model.decoder.embed_positions.weight'][2:])
  # HF -> ours -> HF: every array save_pretrained writes, byte for byte, but the position
  # tables' two unread rows, which come back as zeros.
  exported = hf_bart.params_to_hf(params, cfg)
  model.save_pretrained(tmp_path / 'hf')
  saved = hf_io.read_safetensors(tmp_path / 'hf')
  assert set(exported) == set(saved)
  expected = {k: state[k].copy() for k in exported}
  for name in POSITION_TABLES:
    assert expected[name].shape == (MAX_POS + 2, 32) and expected[name][:2].any()
    expected[name][:2] = 0
  assert _bytes(exported) == _bytes(expected)
  # A save_pretrained directory imports to the same tree as the full state dict.
  fields, from_dir, ids = hf_bart.load_hf_dir(tmp_path / 'hf', scan_layers=scan_layers)
  assert encoder_decoder.EncoderDecoderConfig(**fields) == cfg
  assert ids == dict(bos_id=EOS, eos_id=EOS, pad_id=PAD)
  assert _bytes(from_dir) == _bytes(params)
  # ours -> a directory -> ours.
  hf_bart.save_hf_dir(tmp_path / 'ours', cfg, params, **ids)
  fields, again, ids_again = hf_bart.load_hf_dir(tmp_path / 'ours', scan_layers=scan_layers)
  assert encoder_decoder.EncoderDecoderConfig(**fields) == cfg and ids_again == ids
  assert _bytes(again) == _bytes(params)


def _our_random_params(cfg, seed):
  """Random params of our tree's shapes: N(0, 0.3), norm scales 1 + N(0, 0.3) (ln_embed's
  and the position tables' too)."""
  rng = np.random.default_rng(seed)
  flat = {path: (rng.normal(0, 0.3, s.shape) + path.endswith('/scale')).astype(np.float32)
          for path, s in hf_bart.expected_shapes(cfg).items()}
  assert {'encoder/ln_embed/scale', 'decoder/ln_embed/bias',
          'encoder/position_embed/embedding'} <= set(flat)
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  return hf_bart.stack_layers(params) if cfg.scan_layers else params


def test_our_export_loads_in_transformers_with_same_logits(tmp_path):
  cfg = encoder_decoder.EncoderDecoderConfig(**{
      **hf_bart.config_fields(transformers.BartConfig(**SMALL, encoder_layers=2,
                                                      decoder_layers=3)),
      'activation': 'gelu_tanh', 'scan_layers': True})
  params = _our_random_params(cfg, 3)
  ids = dict(bos_id=EOS, eos_id=EOS, pad_id=PAD)
  tokens, mask = _sources(seed=2)
  decoder_inputs = _decoder_inputs(seed=3)
  ours = _logits(cfg, params, tokens, mask, decoder_inputs)
  # The state dict into a model built from our config.
  state = hf_bart.params_to_hf(params, cfg)
  for name in POSITION_TABLES:
    assert not state[name][:2].any()
  model = transformers.BartForConditionalGeneration(transformers.BartConfig(
      **hf_bart.config_to_hf(cfg, **ids), attn_implementation='eager'))
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                 strict=False)
  assert not result.unexpected_keys, result
  assert set(result.missing_keys) <= {'model.encoder.embed_tokens.weight',
                                      'model.decoder.embed_tokens.weight', 'lm_head.weight'}
  assert model.lm_head.weight is model.model.shared.weight  # the tied copies loaded too
  _close(ours, _hf_logits(model.eval(), tokens, mask, decoder_inputs))
  # save_hf_dir -> from_pretrained, offline.
  hf_bart.save_hf_dir(tmp_path, cfg, params, **ids)
  model, info = transformers.BartForConditionalGeneration.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert model.config.activation_function == 'gelu_new'
  assert model.config.decoder_start_token_id == EOS and model.config.pad_token_id == PAD
  _close(ours, _hf_logits(model.eval(), tokens, mask, decoder_inputs))


# --------------------------------------------------------------------------- decoding


MAX_NEW = 12


def test_greedy_decoding_matches_generate_token_for_token():
  """Scanned layers (the cache's batch on axis 1); decoding starts from EOS as BART's."""
  model = _hf_model(13, 2, 3, eos_boost=2.5, gain=4.0)
  lengths = (9, 8, 7, 6, 5, 4, 3, 2)
  cfg, params = _import(model, scan_layers=True)
  tokens, mask = _sources(lengths=lengths)
  ids = hf_bart.special_ids(model.config)
  assert ids == dict(bos_id=EOS, eos_id=EOS, pad_id=PAD)
  ours, _ = seq2seq_decoding.translate(
      encoder_decoder.EncoderDecoder(cfg), params, tokens, segment_ids_BS=mask,
      max_len=MAX_NEW, sampler='greedy', **ids)
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                         do_sample=False, num_beams=1, max_new_tokens=MAX_NEW,
                         forced_bos_token_id=None, forced_eos_token_id=None,
                         no_repeat_ngram_size=0, min_length=0).numpy()
  assert (out[:, 0] == EOS).all()  # decoder_start_token_id
  expected = np.full((len(lengths), MAX_NEW), PAD)
  expected[:, :out.shape[1] - 1] = out[:, 1:]
  np.testing.assert_array_equal(np.asarray(ours)[:, 0], expected)
  # Rows that end at once, after some tokens, and not at all; one changes token 5 times.
  ends = [list(row).index(EOS) if EOS in row else MAX_NEW for row in expected]
  assert {0, MAX_NEW} <= set(ends) and any(0 < end < MAX_NEW for end in ends), ends
  assert max((row[1:] != row[:-1]).sum() for row in expected) >= 5, expected


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize('field, value', [
    ('model_type', 'mbart'), ('activation_function', 'tanh'),
    ('decoder_attention_heads', 2), ('decoder_ffn_dim', 48),
    ('tie_word_embeddings', False), ('activation_dropout', 0.1),
    ('attention_dropout', 0.3), ('encoder_layerdrop', 0.1), ('decoder_layerdrop', 0.1),
    ('normalize_before', True), ('add_final_layer_norm', True),
    ('normalize_embedding', False), ('static_position_embeddings', True),
    ('add_bias_logits', True), ('extra_pos_embeddings', 0), ('is_decoder', True)])
def test_config_rejects_what_we_cannot_represent(field, value):
  hf = transformers.BartConfig(**SMALL).to_dict()
  assert encoder_decoder.EncoderDecoderConfig(**hf_bart.config_fields(hf))
  # The legacy keys as transformers 3 wrote them, at BART's values, are accepted.
  legacy = dict(normalize_before=False, add_final_layer_norm=False, normalize_embedding=True,
                static_position_embeddings=False, add_bias_logits=False,
                extra_pos_embeddings=2)
  assert hf_bart.config_fields({**hf, **legacy}) == hf_bart.config_fields(hf)
  with pytest.raises(ValueError, match=field if field != 'is_decoder' else
                     'is_encoder_decoder'):
    hf_bart.config_fields({**hf, field: value})


def test_config_round_trips_and_export_refuses_other_models():
  cfg = encoder_decoder.EncoderDecoderConfig(**{
      **hf_bart.config_fields(transformers.BartConfig(**SMALL)),
      'num_layers': 3, 'num_decoder_layers': 1, 'init_stddev': 0.05, 'dropout_rate': 0.2,
      'scale_embeddings': True, 'activation': 'relu'})
  hf = hf_bart.config_to_hf(cfg, bos_id=5, eos_id=6, pad_id=7)
  assert encoder_decoder.EncoderDecoderConfig(**hf_bart.config_fields(hf)) == cfg
  assert hf_bart.special_ids(hf) == dict(bos_id=5, eos_id=6, pad_id=7)
  # transformers reads it back as the same config.
  assert transformers.BartConfig(**hf).encoder_layers == 3
  # Unset decoder start: generate() starts from bos_token_id.
  assert hf_bart.special_ids({**hf, 'decoder_start_token_id': None, 'bos_token_id': 0}) == (
      dict(bos_id=0, eos_id=6, pad_id=7))
  with pytest.raises(ValueError, match='eos_token_id'):
    hf_bart.special_ids({**hf, 'eos_token_id': [2, 3]})
  for field, value in (('embed_norm', False), ('position', 'sinusoidal'),
                       ('norm_position', 'pre'), ('norm_epsilon', 1e-6),
                       ('scale_tied_output', True), ('share_embeddings', False),
                       ('activation', 'geglu')):
    with pytest.raises(ValueError, match=f'EncoderDecoderConfig.{field}'):
      hf_bart.config_to_hf(dataclasses.replace(cfg, **{field: value}), bos_id=1, eos_id=2,
                           pad_id=3)


def test_state_dicts_with_what_ours_cannot_hold_are_refused():
  model = _hf_model(13, 1, 1)
  state = _state(model)
  cfg, params = _import(model)
  biased = {**state, 'final_logits_bias': state['final_logits_bias'] + 0.5}
  with pytest.raises(ValueError, match='final_logits_bias .* must be zeros'):
    hf_bart.params_from_hf(biased, cfg)
  untied = {**state, 'lm_head.weight': state['lm_head.weight'] + 1}
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    hf_bart.params_from_hf(untied, cfg)
  # A table without BART's two leading rows does not fit.
  short = {**state, 'model.encoder.embed_positions.weight':
           state['model.encoder.embed_positions.weight'][2:]}
  with pytest.raises(ValueError, match=r'embed_positions.weight \(40, 32\).*expected \(40'):
    hf_bart.params_from_hf(short, cfg)
  extra = {**state, 'model.encoder.layer_norm.weight': np.ones(32, np.float32)}
  with pytest.raises(ValueError, match='unexpected .* bart .*encoder.layer_norm.weight'):
    hf_bart.params_from_hf(extra, cfg)
  for name in ('model.decoder.layernorm_embedding.bias', 'model.decoder.layers.0.fc2.bias'):
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(ValueError, match=name):
      hf_bart.params_from_hf(missing, cfg)
  # A bare BartModel's names (no 'model.' prefix, no lm_head) import the same.
  bare = {k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')}
  assert _bytes(hf_bart.params_from_hf(bare, cfg)) == _bytes(params)
