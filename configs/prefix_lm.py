"""T5's decoder-only prefix LM (Raffel et al. 2020, sec. 3.2.1, table 2): one GPT-2-style
stack whose attention sees the whole prefix and is causal over the rest, trained on the
continuation alone, from the same corrupted text as configs/t5.py:objective=prefix_lm.

  python train.py --config=configs/prefix_lm.py:size=tiny --workdir=workdirs/prefix_lm
  python eval.py --workdir=workdirs/prefix_lm --splits=validation
  python eval.py --workdir=workdirs/prefix_lm --splits= --prompt="In the beginning God"

Arguments: size (tiny | study).

The data: task 'prefix_lm' of data/denoising_data.py (both sides of bible/en_es as
monolingual documents, each chunk split at a uniform point, seeded as the encoder-decoder
task), read by a decoder-only model as one row per example: [bos] prefix continuation
[eos] (data/decoder_prefix_lm.py). The vocabulary is configs/t5.py's
(`bible_en_es-en-es_bpe_<V>`), without sentinels. The prompt of eval.py's --prompt is
the prefix (models/decoding.py).

The model: GPT-2's block (configs/gpt.py: pre-LN LayerNorms, tanh GELU, biases, learned
positions, tied output) with mask='prefix_lm'. At the study size it has T5 study's
width and as many layers as T5's encoder and decoder together (T5's comparison pairs an
L + L encoder-decoder with a 2L-layer decoder of about as many parameters), and trains
with T5's optimizer recipe (Adam, inverse square-root decay).
"""

import ml_collections

from configs import common

# (layers, heads, width, MLP, row, vocabulary, batch, steps, peak learning rate, warmup)
SIZES = {
    'tiny': dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, seq_len=32,
                 vocab_size=512, batch_size=8, num_steps=20, learning_rate=3e-3,
                 warmup_steps=5),
    # configs/t5.py's study size (2 + 2 layers there): minutes per run on 2 CPU cores.
    'study': dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, seq_len=64,
                  vocab_size=4000, batch_size=32, num_steps=400, learning_rate=2e-3,
                  warmup_steps=100),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny')
  size = common.pick(SIZES, arg.size, 'size')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      task='prefix_lm',       # T5's prefix LM examples; a GPT reads them as single rows
      name='bible/en_es',
      text_key='en,es',       # both sides, each verse a document of its own
      files='',               # or the user's text files (text_key='text')
      data_dir='',
      tokenizer='bpe',
      vocab_size=size['vocab_size'],
      seq_len=size['seq_len'],  # the row: [bos] + a chunk of seq_len - 2 tokens + [eos]
      batch_size=size['batch_size'],
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
      norm_position='pre', norm='layer', norm_epsilon=1e-5, activation='gelu_tanh',
      use_bias=True, init_stddev=0.02, scale_residual_init=True,
      # The prefix (prefix_lengths_B from the rows) is read bidirectionally.
      **common.stack_settings(mask='prefix_lm'),
  )
  c.objective = 'prefix_lm'  # next-token loss on the continuation only

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
