"""BART (Lewis et al. 2020) pretrained on the corpus's text: the shared encoder-decoder
configured as BART, trained to reconstruct documents corrupted by BART's noising functions.

  python train.py --config=configs/bart.py:size=small --workdir=workdirs/bart
  python train.py --config=configs/text_to_text.py:init_from=workdirs/bart,mixture=modernize \
      --workdir=workdirs/bart-modernize
  python eval.py --workdir=workdirs/bart-modernize --splits=test

Arguments: size (tiny | small | study), noising (data/bart_noising.parse: comma-separated
inside the config argument is taken by its own syntax, so functions are joined with '+':
'infill=0.3+permute' is BART's best, 'mask=0.3', 'delete=0.3', 'rotate', ...).

The architecture (`bart_model`): post-LN blocks with biases, LayerNorm over each side's
embeddings, learned absolute positions (each side its own table; Hugging Face's offset of
2 rows is the importer's business, hf/bart.py), exact GELU, one token table for source,
target and output, embeddings unscaled.

The corpus: both sides of bible/en_es as monolingual text (see configs/t5.py); each verse is
a document of [BOS] text [EOS], its sentences ending in '.', '!' or '?'.
"""

import ml_collections

from configs import common

# (layers per stack, heads, width, MLP, row, vocabulary, batch, steps, peak learning rate,
#  warmup, dropout)
SIZES = {
    'tiny': dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, seq_len=32,
                 vocab_size=512, batch_size=8, num_steps=20, learning_rate=3e-3,
                 warmup_steps=5, dropout_rate=0.0),
    'study': dict(num_layers=2, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=64,
                  vocab_size=4000, batch_size=32, num_steps=400, learning_rate=1e-3,
                  warmup_steps=100, dropout_rate=0.1),
    'small': dict(num_layers=3, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=64,
                  vocab_size=4000, batch_size=32, num_steps=1000, learning_rate=1e-3,
                  warmup_steps=200, dropout_rate=0.1),
}


def bart_model(**fields) -> dict:
  """The encoder-decoder fields (models/encoder_decoder.py) of BART, plus `fields`."""
  return dict(
      norm_position='post', norm='layer', norm_epsilon=1e-5, use_bias=True,
      activation='gelu', scale_residual_init=False, share_embeddings=True,
      tie_output=True, scale_tied_output=False, scale_embeddings=False, embed_norm=True,
      encoder_mask='bidirectional',
      **common.stack_settings(mask='causal', position='learned'),
      **fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny', noising='infill=0.3+permute')
  size = common.pick(SIZES, arg.size, 'size')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      task='bart_denoising',
      name='bible/en_es',
      text_key='en,es',
      files='',
      data_dir='',
      tokenizer='bpe',
      vocab_size=size['vocab_size'],
      seq_len=size['seq_len'],
      targets_len=0,              # 0: as the inputs
      noising=arg.noising.replace('+', ','),
      batch_size=size['batch_size'],
      seed=0,
  )

  c.model_name = 'encoder_decoder'
  c.model = bart_model(
      vocab_size=c.data.get_ref('vocab_size'), max_len=c.data.get_ref('seq_len'),
      num_layers=size['num_layers'], num_decoder_layers=0, num_heads=size['num_heads'],
      embed_dim=size['embed_dim'], mlp_dim=size['mlp_dim'],
      dropout_rate=size['dropout_rate'], init_stddev=0.02,
      dtype='float32', param_dtype='float32')
  c.objective = 'seq2seq'
  c.objective_settings = dict(label_smoothing=0.0)

  # BART: Adam, warmup then linear decay (the paper's fairseq recipe).
  c.optimizer = dict(
      learning_rate=size['learning_rate'],
      warmup_steps=size['warmup_steps'],
      decay='linear',
      end_learning_rate_factor=0.0,
      b1=0.9, b2=0.98, eps=1e-6,
      weight_decay=0.01,
      clip_norm=1.0,
  )

  c.train = common.pretraining_train(size['num_steps'], tiny=arg.size == 'tiny')

  c.mesh = dict(common.MESH)
  c.logical_axis_rules = common.LOGICAL_AXIS_RULES
  c.lock()
  return c
