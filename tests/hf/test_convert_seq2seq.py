"""hf.convert for the encoder-decoders: a T5 (v1.1, v1.0), BART or Marian directory ->
`import` -> a workdir whose model (loop.build from its config.json, eval.py's restore of
its checkpoint) gives the HF model's logits -> `export` -> a directory that transformers'
AutoModelForSeq2SeqLM loads with the same logits and special ids. Refusals: special ids
that are not the tokenizer's, an unsupported model_type, a workdir of no HF family.

transformers' models come from small random configs (no downloads), every parameter
redrawn so that a swapped or dropped tensor shows. Each has a tiny tokenizer the project
reads, in one of the three published forms: vocab.txt (T5), vocab.json + merges.txt (BART),
tokenizer.json (Marian); the HF configs' special ids are the tokenizer's (decoding starts
from its bos), which our pipelines need.
"""

import json
import string

import jax
import numpy as np
import pytest

from configs import bart as bart_config
from configs import gpt as gpt_config
from configs import t5 as t5_config
from configs import translation as translation_config
import eval as eval_lib
from hf import convert
from models import encoder_decoder
from tests import tolerances
from training import checkpoint

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

# WordPiece: [PAD] 0, [UNK] 1, [CLS] 2 (bos: where decoding starts), [SEP] 3 (eos), [MASK]
# 4, letters, their continuations, punctuation.
PIECES = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list(string.ascii_lowercase)
          + ['##' + c for c in string.ascii_lowercase] + list('.,;:!?\''))
# Marian's order: EOS first, pad last; its start token beside it.
MARIAN_PIECES = (['[SEP]', '[UNK]'] + PIECES[5:] + ['[MASK]', '[CLS]', '[PAD]'])
T5_SENTINELS = 8  # model ids above the tokenizer's: span corruption's sentinels
SOURCE_LENGTHS = (9, 6, 3)  # real tokens per row, the last one EOS; then padding
TARGET_LENGTH = 7
TINY = dict(d_model=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
            max_position_embeddings=40, forced_eos_token_id=None)


def _write_vocab_txt(path):
  (path / 'vocab.txt').write_text('\n'.join(PIECES) + '\n')


def _write_byte_bpe(path) -> int:
  """RoBERTa/BART's files: <s> 0, <pad> 1, </s> 2, <unk> 3, every byte, three merges,
  <mask> last; returns the vocabulary's size."""
  merges = [('Ġ', 't'), ('h', 'e'), ('Ġt', 'he')]
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  pieces = ['<s>', '<pad>', '</s>', '<unk>'] + alphabet + [a + b for a, b in merges] + ['<mask>']
  (path / 'vocab.json').write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
  (path / 'merges.txt').write_text('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  return len(pieces)


def _write_tokenizer_json(path):
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(
      {p: i for i, p in enumerate(MARIAN_PIECES)}, unk_token='[UNK]'))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.save(str(path / 'tokenizer.json'))


def _t5(version, **ids):
  v11 = version == 'v1.1'
  config = transformers.T5Config(
      vocab_size=len(PIECES) + T5_SENTINELS, d_model=32, d_kv=16, d_ff=48, num_heads=2,
      num_layers=2, num_decoder_layers=2, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, dropout_rate=0.0,
      feed_forward_proj='gated-gelu' if v11 else 'relu', tie_word_embeddings=not v11,
      **{'pad_token_id': 0, 'eos_token_id': 3, 'decoder_start_token_id': 2, **ids},
      attn_implementation='eager')
  model = transformers.T5ForConditionalGeneration(config)
  if v11:  # transformers 5 ties T5's lm_head whatever the config says (hf/t5.py)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  return model


def _bart(vocab_size, **ids):
  config = transformers.BartConfig(
      vocab_size=vocab_size, **TINY, attn_implementation='eager',
      **{'bos_token_id': 0, 'pad_token_id': 1, 'eos_token_id': 2, 'decoder_start_token_id': 0,
         **ids})
  return transformers.BartForConditionalGeneration(config)


def _marian(**ids):
  pad = len(MARIAN_PIECES) - 1
  config = transformers.MarianConfig(
      vocab_size=len(MARIAN_PIECES), **TINY, activation_function='relu', scale_embedding=True,
      attn_implementation='eager',
      **{'pad_token_id': pad, 'eos_token_id': 0, 'decoder_start_token_id': pad - 1, **ids})
  return transformers.MarianMTModel(config)


def _hf_dir(path, family, **ids):
  """Saves a random model of `family` with its tokenizer in `path`; returns the model."""
  path.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)
  if family.startswith('t5'):
    _write_vocab_txt(path)
    model = _t5(family[3:], **ids)
  elif family == 'bart':
    model = _bart(_write_byte_bpe(path), **ids)
  else:
    _write_tokenizer_json(path)
    model = _marian(**ids)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'embed_positions' in name and family == 'marian':
        continue  # Marian's frozen sinusoids
      p.normal_(0.0, 0.3)
      if 'norm' in name and name.endswith('weight'):
        p.add_(1.0)
  model.eval().save_pretrained(path)
  return model


def _batch(config, seed=0):
  """Padded sources ending in EOS, their mask, and decoder inputs from the start token."""
  rng = np.random.default_rng(seed)
  specials = {config.pad_token_id, config.eos_token_id, config.decoder_start_token_id,
              getattr(config, 'bos_token_id', None)}
  ordinary = np.array([i for i in range(config.vocab_size) if i not in specials])
  rows, length = len(SOURCE_LENGTHS), max(SOURCE_LENGTHS)
  tokens = rng.choice(ordinary, (rows, length))
  tokens[np.arange(rows), np.array(SOURCE_LENGTHS) - 1] = config.eos_token_id
  mask = np.arange(length)[None] < np.array(SOURCE_LENGTHS)[:, None]
  tokens = np.where(mask, tokens, config.pad_token_id)
  decoder_inputs = np.concatenate([np.full((rows, 1), config.decoder_start_token_id),
                                   rng.choice(ordinary, (rows, TARGET_LENGTH - 1))], axis=1)
  return tokens, mask.astype(np.int64), decoder_inputs


def _hf_logits(model, batch):
  tokens, mask, decoder_inputs = (torch.tensor(x) for x in batch)
  with torch.no_grad():
    return model(input_ids=tokens, attention_mask=mask,
                 decoder_input_ids=decoder_inputs).logits.numpy()


FAMILIES = ('t5-v1.1', 't5-v1.0', 'bart', 'marian')


@pytest.fixture(scope='module', params=FAMILIES)
def imported(request, tmp_path_factory):
  """(family, the HF model, its directory, the workdir `import` wrote, import's result)."""
  root = tmp_path_factory.mktemp(request.param)
  model = _hf_dir(root / 'hf', request.param)
  result = convert.import_to_workdir(root / 'hf', root / 'work')
  return request.param, model, root / 'hf', root / 'work', result


def test_import_gives_a_workdir_with_the_hf_models_logits(imported):
  family, model, hf_dir, workdir, result = imported
  config = result['config']
  assert config.model_name == 'encoder_decoder' and result['fresh'] == ()
  # config.model is the HF model's architecture, field by field.
  fields = convert.SEQ2SEQ[family[:2] if family.startswith('t5') else family].config_fields(
      model.config)
  assert {k: config.model[k] for k in fields if k != 'max_len'} == {
      k: v for k, v in fields.items() if k != 'max_len'}
  assert config.data.tokenizer_path == str(hf_dir)
  if family.startswith('t5'):  # the ids above the tokenizer's are the sentinels
    assert (config.data.vocab_size, config.data.extra_ids) == (len(PIECES), T5_SENTINELS)
    # No position table: the rows stay the tiny config's.
    assert config.model.max_len == config.data.seq_len == 32
  else:
    assert config.model.max_len == model.config.max_position_embeddings
  # The workdir as eval.py sees it: loop.build from config.json, the step-0 checkpoint.
  evaluator = eval_lib.Evaluator(str(workdir))
  tokenizer = evaluator.exp.tokenizer
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
      model.config.decoder_start_token_id, model.config.eos_token_id,
      model.config.pad_token_id)
  params = evaluator.restore(0).params
  tokens, mask, decoder_inputs = batch = _batch(model.config)
  logits = jax.jit(evaluator.exp.model.apply)({'params': params}, tokens, decoder_inputs,
                                               inputs_segment_ids_BS=mask)
  tolerances.assert_close(np.asarray(logits), _hf_logits(model, batch))


def test_export_loads_in_transformers_with_the_same_logits_and_ids(imported, tmp_path):
  family, model, _, workdir, _ = imported
  out = tmp_path / 'out'
  files = {f.name for f in convert.export_from_workdir(workdir, out)}
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= files
  exported = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
  assert type(exported) is type(model)
  ids = ('decoder_start_token_id', 'eos_token_id', 'pad_token_id', 'bos_token_id')
  assert {k: getattr(exported.config, k, None) for k in ids} == {
      k: getattr(model.config, k, None) for k in ids}, family
  batch = _batch(model.config, seed=1)
  tolerances.assert_close(_hf_logits(exported, batch), _hf_logits(model, batch))


def test_eval_evaluates_an_imported_workdir(tmp_path):
  """eval.py's evaluation (one split, the config's few batches of span corruption)."""
  _hf_dir(tmp_path / 'hf', 't5-v1.0')
  convert.import_to_workdir(tmp_path / 'hf', tmp_path / 'work')
  results = eval_lib.Evaluator(str(tmp_path / 'work')).evaluate(0, ('validation',))
  loss = results['validation']['loss']
  # A random model over 72 ids: finite, and nowhere near a trained one's.
  assert np.isfinite(loss) and loss > 1.0
  assert (tmp_path / 'work' / 'eval' / 'step_0.json').is_file()


@pytest.mark.parametrize('family, ids, expected', [
    # T5's own: pad 0 where decoding starts, EOS 1.
    ('t5-v1.1', dict(eos_token_id=1, decoder_start_token_id=None),
     ["decoder_start_token_id=0 (unset", "bos '[CLS]' is 2",
      "eos_token_id=1 but the tokenizer's eos '[SEP]' is 3"]),
    # BART's own: decoding starts from EOS 2; its <s> 0 is the tokenizer's bos.
    ('bart', dict(decoder_start_token_id=2), ["decoder_start_token_id=2 but the tokenizer's "
                                              "bos '<s>' is 0"]),
    ('bart', dict(bos_token_id=2, decoder_start_token_id=2),
     ["bos_token_id=2 but the tokenizer's bos '<s>' is 0"]),
    ('marian', dict(pad_token_id=5, decoder_start_token_id=len(MARIAN_PIECES) - 2),
     [f"pad_token_id=5 but the tokenizer's pad '[PAD]' is {len(MARIAN_PIECES) - 1}"]),
])
def test_import_refuses_special_ids_that_are_not_the_tokenizers(family, ids, expected,
                                                                tmp_path):
  _hf_dir(tmp_path / 'hf', family, **ids)
  with pytest.raises(ValueError) as info:
    convert.import_to_workdir(tmp_path / 'hf', tmp_path / 'work')
  for fragment in expected:
    assert fragment in str(info.value)
  assert not (tmp_path / 'work' / 'config.json').exists()


def test_import_names_the_supported_model_types(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported: bert, roberta, "
                     r'electra, deberta-v2, t5, bart, marian'):
    convert.import_to_workdir(tmp_path, tmp_path / 'work')


def test_export_names_the_supported_models_and_why_an_encoder_decoder_is_none(tmp_path):
  for name, config in (('gpt', gpt_config.get_config()),
                       ('translation', translation_config.get_config())):
    (tmp_path / name).mkdir()
    checkpoint.write_json(str(tmp_path / name / 'config.json'), config.to_dict())
  with pytest.raises(ValueError, match=r"model_name='gpt'.*'encoder_decoder' \(T5, BART, "
                     r'Marian\)'):
    convert.export_from_workdir(tmp_path / 'gpt', tmp_path / 'out')
  # The translation config's own Transformer: post-LN at 1e-6, no T5, BART or Marian.
  with pytest.raises(ValueError) as info:
    convert.export_from_workdir(tmp_path / 'translation', tmp_path / 'out')
  for fragment in ("t5: EncoderDecoderConfig.norm_position='post'",
                   "bart: EncoderDecoderConfig.norm_epsilon=1e-06",
                   "marian: EncoderDecoderConfig.norm_epsilon=1e-06"):
    assert fragment in str(info.value)
  assert not (tmp_path / 'out').exists()


def test_our_pretraining_configs_export_as_their_hf_family():
  """What a trained workdir of configs/t5.py, configs/bart.py, or configs/translation.py set
  to Marian's block exports as."""
  translation = translation_config.get_config()
  translation.unlock()
  translation.model.update(norm_epsilon=1e-5, sinusoid_layout='concatenated')
  for config, family in ((t5_config.get_config('version=1.0'), 't5'),
                         (t5_config.get_config('version=1.1'), 't5'),
                         (bart_config.get_config(), 'bart'), (translation, 'marian')):
    cfg = encoder_decoder.EncoderDecoderConfig(**config.model)
    assert convert.seq2seq_family(cfg, 'w') is convert.SEQ2SEQ[family]
