"""DeBERTa pretraining (He et al. 2021): masked LM with DeBERTa-v2's disentangled attention.

  python train.py --config=configs/deberta.py:size=tiny --workdir=/tmp/deberta
  python train.py --config=configs/deberta.py:size=small,emd=0 ...   # no EMD

The data, masking and optimizer are configs/bert.py's, with RoBERTa's inputs; the model
is models/deberta.py with DeBERTa-v2's settings:
  * masked LM alone on FULL-SENTENCES rows (contiguous sentences up to the length),
    dynamic masks: 15% of the tokens, 80% [MASK] / 10% random / 10% unchanged;
  * no absolute positions at the input and no token types (v2/v3): positions enter as
    the disentangled c2p + p2c terms over log buckets of a shared, layer-normalised
    relative table that each layer projects with its own W_q, W_k;
  * the enhanced mask decoder as Microsoft's MLM pretraining runs it (`emd=2`: the last
    layer twice more, absolute positions on its queries, before the MLM head);
    transformers has none, so an export to it computes the logits of `emd=0`;
  * post-LN blocks, exact GELU, LayerNorm epsilon 1e-7; Adam(β2 = 0.999, ε = 1e-6) with
    weight decay 0.01, dropout 0.1 (the paper's pretraining table);
  * WordPiece with BERT's specials ([PAD] = 0, [CLS], [SEP], [MASK]: the names and the pad
    id of DeBERTa-v2/v3's SentencePiece vocabulary) trained on the corpus.
"""

import ml_collections

from configs import bert
from configs import common

SIZES = bert.SIZES
# Relative table rows (2 x transformers' position_buckets) per size; the log buckets end at
# the row length (v2/v3: 256 buckets a side up to max_relative_positions = 512).
RELATIVE_BUCKETS = {'tiny': 16, 'small': 64, 'base': 512}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny', emd=2)
  c = bert.get_config(f'size={arg.size}')
  c.unlock()
  c.data.task = 'full_sentences'
  c.data.dupe_factor = 0
  c.model_name = 'deberta'
  model = c.model
  c.model = dict(
      vocab_size=c.data.get_ref('vocab_size'),
      max_len=c.data.get_ref('seq_len'),  # rows of the EMD's absolute position table
      type_vocab_size=0,
      position_biased_input=False,
      emd_layers=arg.emd,
      num_layers=model.num_layers,
      num_heads=model.num_heads,
      embed_dim=model.embed_dim,
      mlp_dim=model.mlp_dim,
      dropout_rate=0.1,
      dtype='float32',
      param_dtype='float32',
      # DeBERTa-v2's block: post-LN, exact GELU, LayerNorm epsilon 1e-7.
      norm_position='post', norm='layer', norm_epsilon=1e-7, activation='gelu',
      use_bias=True, init_stddev=0.02, scale_residual_init=False,
      # Disentangled attention: the 'deberta' scheme as DeBERTa-v2 released it.
      deberta_v2=True, share_att_key=True, pos_att_type='c2p|p2c', norm_rel_ebd='layer_norm',
      **common.stack_settings(mask='bidirectional', position='deberta',
                              relative_buckets=RELATIVE_BUCKETS[arg.size]),
  )
  c.model.relative_max_distance = c.data.get_ref('seq_len')
  c.objective = 'masked_lm'
  c.objective_settings = dict(rate=0.15, mask_fraction=0.8, random_fraction=0.1,
                              whole_word=False)
  c.lock()
  return c
