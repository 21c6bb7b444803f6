"""GPT (decoder-only, GPT-2 style) language model on the offline Bible corpus.

  python train.py --config=configs/gpt.py:size=tiny --workdir=/tmp/gpt
  python train.py --config=configs/gpt.py:size=small --config.train.num_steps=2000 ...
"""

import ml_collections

from configs import common

# (layers, heads, width, mlp width, context, vocabulary, global batch, steps)
SIZES = {
    'tiny': dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=128, seq_len=32,
                 vocab_size=512, batch_size=8, num_steps=20),
    'small': dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=128,
                  vocab_size=2048, batch_size=32, num_steps=800),
    'gpt2': dict(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, seq_len=1024,
                 vocab_size=32000, batch_size=256, num_steps=100_000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny')
  size = common.pick(SIZES, arg.size, 'size')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      name='bible/en',        # a TFDS name (ours or the catalog's), prepared under data_dir
      text_key='text',        # the feature holding the text
      files='',               # or the user's own corpus: a directory of .txt files
      data_dir='',            # '' means $CONTEXTUAL_DATA_DIR, else ./.data
      tokenizer='bpe',        # sentencepiece model type: 'bpe' | 'unigram'
      vocab_size=size['vocab_size'],
      seq_len=size['seq_len'],
      batch_size=size['batch_size'],  # global: split over hosts, then over devices
      seed=0,
  )

  c.model_name = 'gpt'
  c.model = dict(
      vocab_size=c.data.get_ref('vocab_size'),
      max_len=c.data.get_ref('seq_len'),
      num_layers=size['num_layers'],
      num_heads=size['num_heads'],
      embed_dim=size['embed_dim'],
      mlp_dim=size['mlp_dim'],
      dropout_rate=0.0,
      dtype='float32',
      param_dtype='float32',
      # GPT-2's block: pre-LN, tanh GELU, LayerNorm epsilon 1e-5, residual projections
      # initialised with σ/sqrt(2L).
      norm_position='pre', norm='layer', norm_epsilon=1e-5, activation='gelu_tanh',
      use_bias=True, init_stddev=0.02, scale_residual_init=True,
      **common.stack_settings(mask='causal'),
  )
  c.objective = 'causal_lm'

  c.optimizer = dict(
      learning_rate=3e-3 if arg.size != 'gpt2' else 6e-4,
      warmup_steps=max(1, size['num_steps'] // 20),
      decay='cosine',         # 'cosine' | 'linear' | 'constant'
      end_learning_rate_factor=0.1,
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
  )

  c.train = dict(
      num_steps=size['num_steps'],
      log_every=max(1, size['num_steps'] // 100),
      eval_every=max(1, size['num_steps'] // 5),
      eval_batches=0,                 # 0: the whole validation split
      checkpoint_every=max(1, size['num_steps'] // 5),
      keep_checkpoints=3,
      microbatches=1,                 # gradient accumulation: slices of each batch, one by one
      on_nonfinite='stop',            # a NaN/Inf loss or gradient: 'stop' the run or 'skip' the step
      preemption_grace_seconds=120.0,  # after SIGTERM: save, then exit within this long
  )

  c.mesh = dict(common.MESH)
  c.logical_axis_rules = common.LOGICAL_AXIS_RULES
  c.lock()
  return c
