"""The encoder-decoder Transformer (Vaswani et al. 2017) translating English to Spanish.

  python train.py --config=configs/translation.py:size=small --workdir=workdirs/en_es
  python eval.py --workdir=workdirs/en_es --splits=test     # BLEU, chrF, translations
  python eval.py --workdir=workdirs/en_es --translate="In the beginning God created"

Arguments: size (tiny | small | base), pair (en_es: bible/en_es English -> Spanish;
kjv_web: KJV -> WEB modernisation; or `--config.data.name=wmt14_translate/de-en` with
`--config.data.source_key=de --config.data.target_key=en`, or the user's line-aligned files
with `--config.data.files=DIR --config.data.source_key=en --config.data.target_key=de`).

'base' is the paper's base model and recipe: 6 + 6 layers, width 512, 8 heads, MLP 2048,
dropout 0.1, label smoothing 0.1, post-LN, sinusoidal positions, embeddings shared over a
joint vocabulary and scaled by sqrt(D), Adam(0.9, 0.98, 1e-9) with 4000 warmup steps and
inverse square-root decay, beam 4 with length penalty 0.6. 'small' trains on 2 CPU cores in
minutes; 'tiny' in seconds (tests).
"""

import ml_collections

from configs import common

# (layers per stack, heads, width, MLP, source/target rows, joint vocabulary, batch, steps,
#  peak learning rate, warmup, dropout)
SIZES = {
    'tiny': dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, seq_len=32,
                 vocab_size=512, batch_size=8, num_steps=20, learning_rate=3e-3,
                 warmup_steps=5, dropout_rate=0.0),
    'small': dict(num_layers=3, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=64,
                  vocab_size=4000, batch_size=32, num_steps=1000, learning_rate=2e-3,
                  warmup_steps=300, dropout_rate=0.1),
    'base': dict(num_layers=6, num_heads=8, embed_dim=512, mlp_dim=2048, seq_len=128,
                 vocab_size=37000, batch_size=256, num_steps=100_000,
                 learning_rate=512 ** -0.5 * 4000 ** -0.5, warmup_steps=4000,
                 dropout_rate=0.1),
}
PAIRS = {
    'en_es': dict(name='bible/en_es', source_key='en', target_key='es'),
    'kjv_web': dict(name='bible/kjv_web', source_key='kjv', target_key='web'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny', pair='en_es')
  size = common.pick(SIZES, arg.size, 'size')
  pair = common.pick(PAIRS, arg.pair, 'pair')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      task='seq2seq',
      name=pair['name'],
      source_key=pair['source_key'],
      target_key=pair['target_key'],
      files='',               # or the user's line-aligned files (train.en + train.es, ...)
      data_dir='',
      tokenizer='bpe',        # one sentencepiece vocabulary trained on both sides
      vocab_size=size['vocab_size'],
      seq_len=size['seq_len'],      # source row
      targets_len=size['seq_len'],  # target row
      batch_size=size['batch_size'],
      seed=0,
  )

  c.model_name = 'encoder_decoder'
  c.model = dict(
      vocab_size=c.data.get_ref('vocab_size'),
      max_len=c.data.get_ref('seq_len'),
      num_layers=size['num_layers'],
      num_decoder_layers=0,        # 0: as many as the encoder
      num_heads=size['num_heads'],
      embed_dim=size['embed_dim'],
      mlp_dim=size['mlp_dim'],
      dropout_rate=size['dropout_rate'],
      dtype='float32',
      param_dtype='float32',
      # The paper's block: post-LN, ReLU, biases; LayerNorm epsilon 1e-6 as tensor2tensor.
      norm_position='post', norm='layer', norm_epsilon=1e-6, activation='relu',
      use_bias=True, init_stddev=0.02, scale_residual_init=False,
      share_embeddings=True, tie_output=True, scale_embeddings=True, encoder_mask='bidirectional',
      embed_norm=False, scale_tied_output=False,  # BART's and T5's (configs/bart.py, t5.py)
      # Unit sinusoids: the embeddings are scaled by sqrt(D) to unit size (sec. 3.4, 3.5).
      **common.stack_settings(mask='causal', position='sinusoidal', sinusoid_scale=1.0),
  )
  c.objective = 'seq2seq'
  c.objective_settings = dict(label_smoothing=0.1)

  c.optimizer = dict(
      learning_rate=size['learning_rate'],
      warmup_steps=size['warmup_steps'],
      decay='rsqrt',          # peak · sqrt(warmup / step) after warmup (the paper's)
      end_learning_rate_factor=0.0,
      b1=0.9, b2=0.98, eps=1e-9,
      weight_decay=0.0,
      clip_norm=1.0,
  )

  # Decoding: beam search for BLEU during training (on a slice of validation) and eval.py.
  c.translate = dict(
      beam_size=4, alpha=0.6,
      max_len=size['seq_len'],
      batch_size=32,
      eval_examples=0 if arg.size == 'tiny' else 200,
  )

  c.train = dict(
      num_steps=size['num_steps'],
      log_every=max(1, size['num_steps'] // 100),
      eval_every=max(1, size['num_steps'] // 5),
      eval_batches=0 if arg.size != 'base' else 50,
      checkpoint_every=max(1, size['num_steps'] // 5),
      keep_checkpoints=3,
      microbatches=1,
      on_nonfinite='stop',
      preemption_grace_seconds=120.0,
  )

  c.mesh = dict(common.MESH)
  c.logical_axis_rules = common.LOGICAL_AXIS_RULES
  c.lock()
  return c
