"""BERT pretraining (MLM + NSP) on sentence pairs of the offline Bible corpus.

  python train.py --config=configs/bert.py:size=tiny --workdir=/tmp/bert
  python train.py --config=configs/bert.py:size=small --workdir=workdirs/bert
  python train.py --config=configs/bert.py:size=small,dupe_factor=5 ...   # BERT's static masks

The recipe is Devlin et al. 2019 as run (Google's create_pretraining_data.py and
run_pretraining.py): 15% of the non-special tokens selected, 80% [MASK] / 10% random /
10% unchanged, loss = MLM mean + NSP mean, Adam(β2 = 0.999, ε = 1e-6) with weight decay
0.01, linear warmup then linear decay to 0. WordPiece vocabulary trained on the corpus
(or a published vocab.txt through `data.tokenizer_path`). configs/roberta.py is a preset
of this file.
"""

import ml_collections

from configs import common

# (layers, heads, width, mlp width, length, vocabulary, global batch, steps, peak lr)
SIZES = {
    'tiny': dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=128, seq_len=32,
                 vocab_size=512, batch_size=8, num_steps=20, learning_rate=1e-3),
    'small': dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=128,
                  vocab_size=4096, batch_size=32, num_steps=2000, learning_rate=1e-3),
    'base': dict(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, seq_len=512,
                 vocab_size=30522, batch_size=256, num_steps=1_000_000, learning_rate=1e-4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny', dupe_factor=0)
  size = common.pick(SIZES, arg.size, 'size')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      name='bible/kjv_web',   # the task reads verses of this dataset
      task='nsp',             # [CLS] A [SEP] B [SEP], B the next sentence(s) or random
      text_key='web',         # the tokenizer trains on this feature of the training split
      files='',
      data_dir='',            # '' means $CONTEXTUAL_DATA_DIR, else ./.data
      tokenizer='wordpiece',  # BERT's; 'byte_bpe' for RoBERTa
      tokenizer_path='',      # published files (vocab.txt, ...) instead of training
      vocab_size=size['vocab_size'],
      seq_len=size['seq_len'],
      batch_size=size['batch_size'],
      seed=0,
      dupe_factor=arg.dupe_factor,  # 0: dynamic masks on device; k: k static masks/example
  )

  c.model_name = 'bert'
  c.model = dict(
      vocab_size=c.data.get_ref('vocab_size'),
      type_vocab_size=2,
      position_offset=0,       # RoBERTa: 2 (its position ids start after the padding id)
      next_sentence=True,
      mlm_head=True,
      embedding_size=0,        # E < embed_dim: narrower embeddings projected up (ELECTRA)
      num_layers=size['num_layers'],
      num_heads=size['num_heads'],
      embed_dim=size['embed_dim'],
      mlp_dim=size['mlp_dim'],
      dropout_rate=0.1,
      dtype='float32',
      param_dtype='float32',
      # BERT's block: post-LN, exact GELU, LayerNorm epsilon 1e-12.
      norm_position='post', norm='layer', norm_epsilon=1e-12, activation='gelu',
      use_bias=True, init_stddev=0.02, scale_residual_init=False,
      **common.stack_settings(mask='bidirectional'),
  )
  # Rows of the position table: the positions of a row after the offset.
  c.model.max_len = c.data.get_ref('seq_len') + c.model.get_ref('position_offset')
  c.objective = 'bert_pretraining'
  c.objective_settings = dict(
      rate=0.15, mask_fraction=0.8, random_fraction=0.1, whole_word=False, nsp_weight=1.0)

  num_steps = size['num_steps']
  c.optimizer = dict(
      learning_rate=size['learning_rate'],
      warmup_steps=max(1, min(10_000, num_steps // 10)),
      decay='linear', end_learning_rate_factor=0.0,
      b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, clip_norm=1.0,
  )
  c.train = dict(
      num_steps=num_steps,
      log_every=max(1, num_steps // 100),
      eval_every=max(1, num_steps // 5),
      eval_batches=0 if arg.size != 'base' else 50,
      checkpoint_every=max(1, num_steps // 5),
      keep_checkpoints=3,
      microbatches=1,
      on_nonfinite='stop',
      preemption_grace_seconds=120.0,
  )
  c.mesh = dict(common.MESH)
  c.logical_axis_rules = common.LOGICAL_AXIS_RULES
  c.lock()
  return c
