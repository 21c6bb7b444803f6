"""T5 (Raffel et al. 2020) pretrained on the corpus's text: the shared encoder-decoder
configured as T5 v1.0 or v1.1, trained by span corruption or another objective of T5's
comparison (table 4).

  python train.py --config=configs/t5.py:size=small --workdir=workdirs/t5
  python train.py --config=configs/text_to_text.py:init_from=workdirs/t5,mixture=modernize \
      --workdir=workdirs/t5-modernize
  python eval.py --workdir=workdirs/t5-modernize --splits=test

Arguments: size (tiny | small | study), version (1.0 | 1.1), objective (span_corruption |
prefix_lm | mlm_denoising: the data task of data/denoising_data.py).

The architecture (`t5_model`): pre-LN blocks with RMS norms and no biases anywhere,
attention logits unscaled (T5 folds 1/sqrt(d) into the initialisation), T5's relative
position buckets (one table per stack, shared by its layers; bidirectional in the encoder,
causal in the decoder), no absolute positions, embeddings unscaled. v1.0: ReLU MLP, the
output projection tied to the embeddings and fed the decoder's output × D^-1/2. v1.1:
gated-GELU MLP, an untied output projection.

The corpus: both sides of bible/en_es (English and Spanish verses) as monolingual text, so
the vocabulary is the one the translation runs train (`bible_en_es-en-es_bpe_<V>`) and the
pretrained model can be fine-tuned to translate as well as to modernise English. Sentinels
are `extra_ids` ids above the tokenizer's vocabulary (T5: 100).
"""

import ml_collections

from configs import common

# (layers per stack, heads, width, MLP, input row, vocabulary, batch, steps, peak learning
#  rate, warmup, dropout)
SIZES = {
    'tiny': dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, seq_len=32,
                 vocab_size=512, batch_size=8, num_steps=20, learning_rate=3e-3,
                 warmup_steps=5, dropout_rate=0.0),
    # The studies' size: minutes per run on 2 CPU cores.
    'study': dict(num_layers=2, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=64,
                  vocab_size=4000, batch_size=32, num_steps=400, learning_rate=2e-3,
                  warmup_steps=100, dropout_rate=0.0),
    'small': dict(num_layers=3, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=64,
                  vocab_size=4000, batch_size=32, num_steps=1000, learning_rate=2e-3,
                  warmup_steps=200, dropout_rate=0.0),
}
VERSIONS = {
    # v1.0: ReLU, tied output with T5's rescaling.
    '1.0': dict(activation='relu', tie_output=True, scale_tied_output=True),
    # v1.1: gated GELU (tanh approximation, HF's gelu_new), untied output.
    '1.1': dict(activation='geglu_tanh', tie_output=False, scale_tied_output=False),
}
OBJECTIVES = ('span_corruption', 'prefix_lm', 'mlm_denoising')
EXTRA_IDS = 100


def t5_model(version: str, **fields) -> dict:
  """The encoder-decoder fields (models/encoder_decoder.py) of T5 `version`, plus `fields`
  (the sizes, vocabulary, max_len)."""
  return dict(
      norm_position='pre', norm='rms', norm_epsilon=1e-6, use_bias=False,
      scale_residual_init=False, share_embeddings=True, scale_embeddings=False,
      embed_norm=False, encoder_mask='bidirectional',
      **common.stack_settings(mask='causal', attention='dot', position='t5',
                              relative_buckets=32, relative_max_distance=128),
      **common.pick(VERSIONS, version, 'T5 version'),
      **fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny', version='1.1', objective='span_corruption')
  size = common.pick(SIZES, arg.size, 'size')
  if arg.objective not in OBJECTIVES:
    raise ValueError(f'unknown objective {arg.objective!r}; choose one of '
                     f'{", ".join(OBJECTIVES)}')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      task=arg.objective,
      name='bible/en_es',
      text_key='en,es',       # both sides, each verse a document of its own
      files='',               # or the user's text files (text_key='text')
      data_dir='',
      tokenizer='bpe',
      vocab_size=size['vocab_size'],
      extra_ids=EXTRA_IDS,
      seq_len=size['seq_len'],    # the input row; span corruption fills it exactly
      targets_len=0,              # 0: what the objective needs (span corruption: ~0.27 S)
      noise_density=0.15,         # span_corruption, mlm_denoising
      mean_span_length=3.0,       # span_corruption
      batch_size=size['batch_size'],
      seed=0,
  )

  c.model_name = 'encoder_decoder'
  c.model = t5_model(
      arg.version,
      vocab_size=c.data.get_ref('vocab_size') + c.data.get_ref('extra_ids'),
      max_len=c.data.get_ref('seq_len'),
      num_layers=size['num_layers'], num_decoder_layers=0, num_heads=size['num_heads'],
      embed_dim=size['embed_dim'], mlp_dim=size['mlp_dim'],
      dropout_rate=size['dropout_rate'], init_stddev=0.02,
      dtype='float32', param_dtype='float32')
  c.objective = 'seq2seq'
  c.objective_settings = dict(label_smoothing=0.0)

  # T5 pretrains with Adafactor at 1/sqrt(max(step, warmup)); Adam with the same inverse
  # square-root schedule trains these small models as well.
  c.optimizer = dict(
      learning_rate=size['learning_rate'],
      warmup_steps=size['warmup_steps'],
      decay='rsqrt',
      end_learning_rate_factor=0.0,
      b1=0.9, b2=0.98, eps=1e-9,
      weight_decay=0.0,
      clip_norm=1.0,
  )

  c.train = common.pretraining_train(size['num_steps'], tiny=arg.size == 'tiny')

  c.mesh = dict(common.MESH)
  c.logical_axis_rules = common.LOGICAL_AXIS_RULES
  c.lock()
  return c
