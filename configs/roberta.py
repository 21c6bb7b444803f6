"""RoBERTa pretraining (Liu et al. 2019): a preset of configs/bert.py, not a copy.

  python train.py --config=configs/roberta.py:size=tiny --workdir=/tmp/roberta
  python train.py --config=configs/roberta.py:size=small,microbatches=4 ...   # 4x the batch

What differs from BERT, as the paper runs it:
  * no NSP: the objective is masked_lm alone, and the model has no NSP head;
  * FULL-SENTENCES inputs: contiguous sentences packed up to the length, crossing document
    boundaries with a separator (data.task = 'full_sentences');
  * dynamic masking: a new mask each time a sentence is seen (data.dupe_factor = 0);
  * byte-level BPE (data.tokenizer = 'byte_bpe'), RoBERTa's special ids (<pad> = 1);
  * position ids offset by 2 as RoBERTa numbers them, one token type, LayerNorm eps 1e-5;
  * large batches: the batch is `microbatches` times BERT's, accumulated (train.microbatches)
    so memory stays that of one slice; Adam β2 = 0.98, ε = 1e-6, peak lr scaled with it.
"""

import ml_collections

from configs import bert
from configs import common
from models import bert as bert_model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny', microbatches=1)
  c = bert.get_config(f'size={arg.size}')
  c.unlock()
  c.data.task = 'full_sentences'
  c.data.tokenizer = 'byte_bpe'
  c.data.vocab_size = max(c.data.vocab_size, 512)  # byte BPE: 256 bytes + 5 specials first
  c.data.dupe_factor = 0
  c.data.batch_size *= arg.microbatches
  c.train.microbatches = arg.microbatches
  # model.max_len follows: seq_len positions after RoBERTa's offset of 2.
  c.model.update(bert_model.roberta_preset())
  c.objective = 'masked_lm'
  c.objective_settings = dict(rate=0.15, mask_fraction=0.8, random_fraction=0.1,
                              whole_word=False)
  c.optimizer.b2 = 0.98
  c.optimizer.learning_rate *= min(arg.microbatches, 4) ** 0.5
  c.lock()
  return c
