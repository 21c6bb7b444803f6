"""hf.convert: an HF directory -> a workdir that eval.py restores -> an HF directory again,
with the same bytes and the same outputs in transformers."""

import string

import jax
import numpy as np
import pytest

import eval as eval_lib
from hf import convert
from hf import io as hf_io
from tests import tolerances

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# A WordPiece vocabulary of 64 pieces: specials, letters, their continuations, punctuation.
PIECES = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list(string.ascii_lowercase)
          + ['##' + c for c in string.ascii_lowercase] + list('.,;:!?\''))


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(PIECES), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=48,
                                   max_position_embeddings=40, attn_implementation='eager')
  model = transformers.BertForPreTraining(config)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  path = tmp_path_factory.mktemp('hf')
  model.save_pretrained(path)
  (path / 'vocab.txt').write_text('\n'.join(PIECES) + '\n')
  return path


@pytest.mark.slow  # ~30 s: builds the NSP task's pipeline and the trainer three times
def test_import_gives_a_workdir_eval_restores_and_export_gives_the_same_model(
    hf_dir, tmp_path):
  workdir = tmp_path / 'work'
  result = convert.import_to_workdir(hf_dir, workdir)
  assert result['fresh'] == ()
  config = result['config']
  assert (config.model.embed_dim, config.model.max_len, config.model.vocab_size) == (32, 40, 64)
  assert config.data.tokenizer_path == str(hf_dir) and config.data.vocab_size == 64

  # eval.py's own restore reads the checkpoint: the weights are those of the HF directory.
  state = eval_lib.Evaluator(str(workdir)).restore(0)
  expected = hf_io.load_hf_dir(hf_dir).params
  assert jax.tree.map(lambda x: np.asarray(x).tobytes(), state.params) == jax.tree.map(
      lambda x: x.tobytes(), expected)

  out = tmp_path / 'out'
  files = {f.name for f in convert.export_from_workdir(workdir, out)}
  assert {'config.json', 'model.safetensors', 'vocab.txt', 'tokenizer.json'} <= files
  original, exported = hf_io.read_safetensors(hf_dir), hf_io.read_safetensors(out)
  assert sorted(original) == sorted(exported)
  for name in original:
    assert original[name].tobytes() == exported[name].tobytes(), name

  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  batch = tokenizer(['in the beginning.', 'jesus wept!'], padding=True, return_tensors='pt')
  with torch.no_grad():
    before = transformers.BertForPreTraining.from_pretrained(hf_dir).eval()(**batch)
    after = transformers.BertForPreTraining.from_pretrained(out).eval()(**batch)
  tolerances.assert_close(after.prediction_logits.numpy(), before.prediction_logits.numpy())


def test_import_refuses_a_used_workdir_and_a_directory_without_tokenizer(hf_dir, tmp_path):
  bare = tmp_path / 'bare'
  bare.mkdir()
  for name in ('config.json', 'model.safetensors'):
    (bare / name).write_bytes((hf_dir / name).read_bytes())
  with pytest.raises(FileNotFoundError, match='no tokenizer files'):
    convert.import_to_workdir(bare, tmp_path / 'w1')
  (tmp_path / 'w2' / 'checkpoints' / '0').mkdir(parents=True)
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    convert.import_to_workdir(hf_dir, tmp_path / 'w2')


@pytest.mark.slow  # ~40 s: the trainer's pipeline twice
def test_deberta_round_trip_through_a_workdir(tmp_path):
  """DebertaV2ForMaskedLM -> `import` -> a workdir eval.py restores -> `export`: the same
  arrays (under Microsoft's MLM head names) and the same logits in transformers."""
  torch.manual_seed(0)
  config = transformers.DebertaV2Config(
      vocab_size=len(PIECES), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=40, type_vocab_size=0,
      position_biased_input=False, relative_attention=True, share_att_key=True,
      pos_att_type=['c2p', 'p2c'], norm_rel_ebd='layer_norm', position_buckets=8,
      max_relative_positions=16, attn_implementation='eager')
  model = transformers.DebertaV2ForMaskedLM(config).eval()
  hf_dir = tmp_path / 'hf'
  model.save_pretrained(hf_dir)
  (hf_dir / 'vocab.txt').write_text('\n'.join(PIECES) + '\n')
  result = convert.import_to_workdir(hf_dir, tmp_path / 'work')
  assert result['config'].model_name == 'deberta' and result['fresh'] == ()
  out = tmp_path / 'out'
  convert.export_from_workdir(tmp_path / 'work', out)
  tokens = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 3, 0]])
  mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
  with torch.no_grad():
    before = model(input_ids=tokens, attention_mask=mask).logits.numpy()
    after = transformers.DebertaV2ForMaskedLM.from_pretrained(out).eval()(
        input_ids=tokens, attention_mask=mask).logits.numpy()
  tolerances.assert_close(after[mask.numpy() == 1], before[mask.numpy() == 1])
