"""Marian <-> transformers' MarianMTModel: teacher-forced logits, greedy and beam decoding
token for token, bitwise round trips both ways, refusals; and the two sinusoid layouts.

transformers' models are built from small random configs (no downloads), every parameter
redrawn (its init leaves biases at 0 and LayerNorms at 1, which would hide a swapped bias);
the frozen sinusoid tables are left as Marian makes them. Special ids as Marian's: EOS 0,
pad the last id, decoding starts from pad.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf import io as hf_io
from hf import marian as hf_marian
from models import encoder_decoder
from models import positions
from models import seq2seq_decoding
from tests import tolerances

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB, MAX_POS = 24, 40
EOS, PAD = 0, VOCAB - 1
SOURCE_LENGTHS = (9, 6, 3)  # real tokens per source row (the last one EOS); then padding
TARGET_LENGTH = 7
SMALL = dict(vocab_size=VOCAB, d_model=32, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
             max_position_embeddings=MAX_POS, activation_function='relu',
             scale_embedding=True, dropout=0.0, attention_dropout=0.0, pad_token_id=PAD,
             eos_token_id=EOS, decoder_start_token_id=PAD, forced_eos_token_id=None)


def _randomise(model, eos_boost: float = 1.0, gain: float | None = None):
  """Redraws every parameter but the sinusoid tables: N(0, 0.3), LayerNorm scales
  1 + N(0, 0.3); or with `gain`, matrices N(0, gain² / fan_in), biases N(0, 0.05²) and
  scales 1 + N(0, 0.1²), whose greedy paths change token more often (a random tied model
  mostly repeats its last token). `eos_boost` scales EOS's row of the shared table
  (decoding then ends sometimes before its limit)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'embed_positions' in name:
        continue
      if gain is None:
        p.normal_(0.0, 0.3)
        p.add_(1.0 if 'layer_norm.weight' in name else 0.0)
      elif 'layer_norm.weight' in name:
        p.normal_(1.0, 0.1)
      else:
        p.normal_(0.0, 0.05 if p.dim() == 1 else gain / p.shape[1] ** 0.5)
    model.model.shared.weight[EOS] *= eos_boost
  return model.eval()


def _hf_model(seed, encoder_layers=2, decoder_layers=2, eos_boost=1.0, gain=None,
              **overrides):
  torch.manual_seed(seed)
  config = transformers.MarianConfig(**{**SMALL, **overrides}, encoder_layers=encoder_layers,
                                     decoder_layers=decoder_layers,
                                     attn_implementation='eager')
  model = transformers.MarianMTModel(config)
  assert model.lm_head.weight is model.model.shared.weight  # tied, so redrawn together
  return _randomise(model, eos_boost, gain)


def _state(model):
  """Everything state_dict() holds: tied copies, sinusoid tables, final_logits_bias."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _import(model, scan_layers=False):
  cfg = encoder_decoder.EncoderDecoderConfig(
      **hf_marian.config_fields(model.config), scan_layers=scan_layers)
  return cfg, hf_marian.params_from_hf(_state(model), cfg)


def _sources(seed=0, lengths=SOURCE_LENGTHS):
  """[B, 9] source ids ending in EOS, right-padded with PAD, and the padding mask."""
  rng = np.random.default_rng(seed)
  length = max(lengths)
  tokens = rng.integers(1, PAD, (len(lengths), length))
  mask = np.arange(length)[None] < np.array(lengths)[:, None]
  tokens[np.arange(len(lengths)), np.array(lengths) - 1] = EOS
  return np.where(mask, tokens, PAD), mask.astype(np.int64)


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


def _decoder_inputs(seed=1):
  """Teacher forcing's decoder inputs: PAD (Marian's start) then random targets."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, PAD, (len(SOURCE_LENGTHS), TARGET_LENGTH - 1))
  return np.concatenate([np.full((len(SOURCE_LENGTHS), 1), PAD), targets], axis=1)


# ----------------------------------------------------------------------- the layouts


def test_sinusoid_layouts_by_hand_and_as_marian_builds_them():
  p = jnp.array([[0, 1, 3]])
  angle = lambda pos, i, d: pos / 10000 ** (2 * i / d)
  interleaved = np.asarray(positions.sinusoidal(p, 4))
  concatenated = np.asarray(positions.sinusoidal(p, 4, layout='concatenated'))
  for row, pos in enumerate((0, 1, 3)):
    np.testing.assert_allclose(interleaved[0, row], [
        np.sin(angle(pos, 0, 4)), np.cos(angle(pos, 0, 4)),
        np.sin(angle(pos, 1, 4)), np.cos(angle(pos, 1, 4))], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(concatenated[0, row], [
        np.sin(angle(pos, 0, 4)), np.sin(angle(pos, 1, 4)),
        np.cos(angle(pos, 0, 4)), np.cos(angle(pos, 1, 4))], rtol=1e-6, atol=1e-7)
  # The same values, permuted: evens then odds.
  np.testing.assert_array_equal(concatenated, interleaved[..., [0, 2, 1, 3]])
  # Marian's own table (computed in float64), even and odd widths.
  for dim in (32, 7):
    table = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(
        MAX_POS, dim).create_weight().numpy()
    ours = positions.sinusoidal(jnp.arange(MAX_POS)[None], dim, layout='concatenated')[0]
    _close(ours, table)
    assert not np.allclose(positions.sinusoidal(jnp.arange(MAX_POS)[None], dim)[0], table)


def test_sinusoid_layout_is_a_checked_setting():
  scheme = positions.make('sinusoidal', {'sinusoid_scale': 2.0, 'sinusoid_layout': 'concatenated'})
  p = jnp.array([[0, 2, 5]])
  x = scheme.embed(p, max_len=8, features=6, dtype=jnp.float32, param_dtype=jnp.float32)
  np.testing.assert_allclose(x, 2.0 * positions.sinusoidal(p, 6, layout='concatenated'),
                             rtol=1e-6)
  assert positions.make('sinusoidal').sinusoid_layout == 'interleaved'  # the default
  with pytest.raises(ValueError, match="sinusoid_layout must be one of .*got 'sin_cos'"):
    positions.make('sinusoidal', {'sinusoid_layout': 'sin_cos'})
  # Checked in every config, whichever position is picked, naming the field.
  with pytest.raises(ValueError, match='EncoderDecoderConfig.sinusoid_layout'):
    encoder_decoder.EncoderDecoderConfig(num_layers=1, num_heads=2, embed_dim=8, mlp_dim=8,
                                         vocab_size=5, max_len=4, position='learned',
                                         sinusoid_layout='interleave')


# ------------------------------------------------------------------- teacher forcing


@pytest.mark.parametrize('layers, scan_layers, overrides', [
    ((1, 1), False, {}),
    ((2, 1), True, {}),
    ((1, 2), False, dict(activation_function='swish', scale_embedding=False)),
])
def test_teacher_forced_logits_match_transformers(layers, scan_layers, overrides):
  model = _hf_model(sum(layers), *layers, **overrides)
  cfg, params = _import(model, scan_layers)
  assert (cfg.num_layers, cfg.num_decoder_layers, cfg.scan_layers) == (*layers, scan_layers)
  assert cfg.sinusoid_layout == 'concatenated' and cfg.norm_epsilon == 1e-5
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


@pytest.mark.parametrize('scan_layers', [False, True])
def test_import_export_round_trips_are_bitwise(tmp_path, scan_layers):
  model = _hf_model(5, 2, 1)
  state = _state(model)
  cfg, params = _import(model, scan_layers)
  # HF -> ours -> HF: every array save_pretrained writes, byte for byte.
  exported = hf_marian.params_to_hf(params, cfg)
  model.save_pretrained(tmp_path / 'hf')
  saved = hf_io.read_safetensors(tmp_path / 'hf')
  assert set(exported) == set(saved)
  assert _bytes(exported) == _bytes({k: state[k] for k in exported})
  # A save_pretrained directory imports to the same tree as the full state dict.
  fields, from_dir, ids = hf_marian.load_hf_dir(tmp_path / 'hf', scan_layers=scan_layers)
  assert encoder_decoder.EncoderDecoderConfig(**fields) == cfg
  assert ids == dict(bos_id=PAD, eos_id=EOS, pad_id=PAD)
  assert _bytes(from_dir) == _bytes(params)
  # ours -> a directory -> ours.
  hf_marian.save_hf_dir(tmp_path / 'ours', cfg, params, **ids)
  fields, again, ids_again = hf_marian.load_hf_dir(tmp_path / 'ours', scan_layers=scan_layers)
  assert encoder_decoder.EncoderDecoderConfig(**fields) == cfg and ids_again == ids
  assert _bytes(again) == _bytes(params)


def _our_random_params(cfg, seed):
  """Random params of our tree's shapes: N(0, 0.3), norm scales 1 + N(0, 0.3)."""
  rng = np.random.default_rng(seed)
  flat = {path: (rng.normal(0, 0.3, s.shape) + path.endswith('/scale')).astype(np.float32)
          for path, s in hf_marian.expected_shapes(cfg).items()}
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  return hf_marian.stack_layers(params) if cfg.scan_layers else params


def test_our_export_loads_in_transformers_with_same_logits(tmp_path, scan_layers=True):
  cfg = encoder_decoder.EncoderDecoderConfig(**{
      **hf_marian.config_fields(transformers.MarianConfig(**SMALL, encoder_layers=2,
                                                          decoder_layers=2)),
      'activation': 'gelu', 'scan_layers': scan_layers})
  params = _our_random_params(cfg, 3)
  hf_marian.save_hf_dir(tmp_path, cfg, params, bos_id=PAD, eos_id=EOS, pad_id=PAD)
  model, info = transformers.MarianMTModel.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert model.config.activation_function == 'gelu'
  tokens, mask = _sources(seed=2)
  decoder_inputs = _decoder_inputs(seed=3)
  _close(_logits(cfg, params, tokens, mask, decoder_inputs),
         _hf_logits(model.eval(), tokens, mask, decoder_inputs))


# --------------------------------------------------------------------------- decoding


MAX_NEW = 10


def _translate(model, scan_layers=False, lengths=SOURCE_LENGTHS, **kwargs):
  cfg, params = _import(model, scan_layers)
  tokens, mask = _sources(lengths=lengths)
  out, scores = seq2seq_decoding.translate(
      encoder_decoder.EncoderDecoder(cfg), params, tokens, segment_ids_BS=mask,
      max_len=MAX_NEW, **hf_marian.special_ids(model.config), **kwargs)
  return np.asarray(out), None if scores is None else np.asarray(scores)


def _generate(model, lengths=SOURCE_LENGTHS, **kwargs):
  """HF's outputs without the start token, padded with PAD to MAX_NEW."""
  tokens, mask = _sources(lengths=lengths)
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                         max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
  sequences = out.sequences if hasattr(out, 'sequences') else out
  sequences = sequences.numpy()
  assert (sequences[:, 0] == PAD).all()  # decoder_start_token_id
  sequences = sequences[:, 1:]
  padded = np.full((sequences.shape[0], MAX_NEW), PAD)
  padded[:, :sequences.shape[1]] = sequences
  return padded, out


def test_greedy_decoding_matches_generate_token_for_token():
  """Scanned layers: the cache's batch on axis 1 (the beam test runs them unrolled)."""
  model = _hf_model(8, 2, 2, eos_boost=2.5, gain=4.0)
  lengths = (9, 8, 7, 6, 5, 4, 3, 2)
  ours, _ = _translate(model, scan_layers=True, lengths=lengths, sampler='greedy')
  expected, _ = _generate(model, lengths=lengths, num_beams=1)
  np.testing.assert_array_equal(ours[:, 0], expected)
  # Rows that end at once, after some tokens, and not at all; one changes token 5 times.
  ends = [list(row).index(EOS) if EOS in row else MAX_NEW for row in expected]
  assert {0, MAX_NEW} <= set(ends) and any(0 < end < MAX_NEW for end in ends), ends
  assert max((row[1:] != row[:-1]).sum() for row in expected) >= 5, expected


def test_beam_search_matches_generate_every_hypothesis():
  """Beam 4, all 4 hypotheses and their scores. Both run the same search (top 2K
  candidates, the top K may finish, a finished pool of K, stop once no alive beam can
  beat the K-th finished): HF's `early_stopping='never'` with `length_penalty=0.0`, ours
  with alpha=0 (GNMT's penalty and HF's length ** lp are both 1 at 0)."""
  model = _hf_model(11, 2, 2, eos_boost=2.0)
  ours, scores = _translate(model, beam_size=4, alpha=0.0, num_return=4)
  expected, out = _generate(model, num_beams=4, num_return_sequences=4, length_penalty=0.0,
                            early_stopping='never', return_dict_in_generate=True,
                            output_scores=True)
  np.testing.assert_array_equal(ours.reshape(-1, MAX_NEW), expected)
  _close(scores.reshape(-1), out.sequences_scores.numpy())
  ended = (expected == EOS).any(axis=1)
  assert ended.any() and not ended.all()
  # The best hypothesis is not greedy's on some row: the beam did search.
  greedy, _ = _generate(model, num_beams=1)
  assert (greedy != ours[:, 0]).any()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize('field, value', [
    ('model_type', 'bart'), ('activation_function', 'tanh'),
    ('decoder_attention_heads', 2), ('decoder_ffn_dim', 64),
    ('share_encoder_decoder_embeddings', False), ('tie_word_embeddings', False),
    ('decoder_vocab_size', VOCAB + 1), ('activation_dropout', 0.1),
    ('attention_dropout', 0.3), ('encoder_layerdrop', 0.1)])
def test_config_rejects_what_we_cannot_represent(field, value):
  hf = transformers.MarianConfig(**SMALL).to_dict()
  assert encoder_decoder.EncoderDecoderConfig(**hf_marian.config_fields(hf))
  with pytest.raises(ValueError, match=field):
    hf_marian.config_fields({**hf, field: value})


def test_config_round_trips_and_export_refuses_other_blocks():
  cfg = encoder_decoder.EncoderDecoderConfig(**{
      **hf_marian.config_fields(transformers.MarianConfig(**SMALL)),
      'num_layers': 3, 'num_decoder_layers': 1, 'init_stddev': 0.05, 'dropout_rate': 0.2,
      'scale_embeddings': False})
  hf = hf_marian.config_to_hf(cfg, bos_id=1, eos_id=2, pad_id=3)
  assert encoder_decoder.EncoderDecoderConfig(**hf_marian.config_fields(hf)) == cfg
  assert hf_marian.special_ids(hf) == dict(bos_id=1, eos_id=2, pad_id=3)
  # transformers reads it back as the same config.
  assert transformers.MarianConfig(**hf).encoder_layers == 3
  for field, value in (('sinusoid_layout', 'interleaved'), ('norm_position', 'pre'),
                       ('norm_epsilon', 1e-6), ('position', 'learned'),
                       ('share_embeddings', False)):
    with pytest.raises(ValueError, match=f'EncoderDecoderConfig.{field}'):
      hf_marian.config_to_hf(dataclasses.replace(cfg, **{field: value}), bos_id=1, eos_id=2,
                             pad_id=3)


def test_state_dicts_with_what_ours_cannot_hold_are_refused():
  model = _hf_model(13, 1, 1)
  state = _state(model)
  cfg, _ = _import(model)
  biased = {**state, 'final_logits_bias': state['final_logits_bias'] + 0.5}
  with pytest.raises(ValueError, match='final_logits_bias .* must be zeros'):
    hf_marian.params_from_hf(biased, cfg)
  untied = {**state, 'lm_head.weight': state['lm_head.weight'] + 1}
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    hf_marian.params_from_hf(untied, cfg)
  table = state['model.encoder.embed_positions.weight']
  interleaved = {**state, 'model.encoder.embed_positions.weight':
                 np.stack([table[:, :16], table[:, 16:]], -1).reshape(table.shape)}
  with pytest.raises(ValueError, match='embed_positions.weight .* not the concatenated'):
    hf_marian.params_from_hf(interleaved, cfg)
  extra = {**state, 'model.encoder.layernorm_embedding.weight': np.ones(32, np.float32)}
  with pytest.raises(ValueError, match='layernorm_embedding'):
    hf_marian.params_from_hf(extra, cfg)
  missing = {k: v for k, v in state.items() if k != 'model.decoder.layers.0.fc2.bias'}
  with pytest.raises(ValueError, match='model.decoder.layers.0.fc2.bias'):
    hf_marian.params_from_hf(missing, cfg)
  # A bare MarianModel's names (no 'model.' prefix, no lm_head) import the same.
  bare = {k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')}
  assert _bytes(hf_marian.params_from_hf(bare, cfg)) == _bytes(_import(model)[1])
