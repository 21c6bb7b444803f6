"""ELECTRA pretraining (Clark et al. 2020): generator MLM + discriminator RTD, λ = 50.

  python train.py --config=configs/electra.py:size=tiny --workdir=/tmp/electra
  python train.py --config=configs/electra.py:size=small,generator=0.5 --workdir=workdirs/electra
  python train.py --config=configs/bert_finetune.py:task=paraphrase,init_from=workdirs/electra ...

The recipe as Google's electra repository runs it (configure_pretraining.py): 15% of the
tokens masked, 85% of them [MASK] and 15% kept (no random tokens: the generator's samples
are the replacements), loss = MLM + 50 · RTD, samples at temperature 1 from the whole
vocabulary, a generator 1/4 of the discriminator's width with the same depth, token and
position embeddings (with types and their LayerNorm) shared, Adam(β2 = 0.999, ε = 1e-6)
with weight decay 0.01, linear warmup then linear decay. Inputs are contiguous sentences
packed to the row length (data.task = 'full_sentences'; Google packs them likewise, up to
two segments per row, and trains no NSP). Only the discriminator is fine-tuned.

The model block is configs/bert.py's (post-LN, exact GELU, LayerNorm ε 1e-12): ELECTRA is
two BERT encoders, not a new architecture.
"""

import ml_collections

from configs import bert
from configs import common

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size='tiny', generator=0.25, rtd_weight=50.0, num_steps=0,
                         seed=0)
  c = bert.get_config(f'size={arg.size}')
  c.unlock()
  c.seed = arg.seed
  c.data.task = 'full_sentences'
  c.data.dupe_factor = 0
  c.model_name = 'electra'
  # embedding_size 0: E = D. (ELECTRA-Small has E = 128 < D = 256; set it with
  # --config.model.embedding_size=...; both encoders then project E to their widths.)
  c.model.update(next_sentence=False, embedding_size=0, generator_fraction=arg.generator,
                 generator_num_layers=0)
  c.objective = 'electra'
  c.objective_settings = dict(rate=0.15, mask_fraction=0.85, random_fraction=0.0,
                              whole_word=False, rtd_weight=arg.rtd_weight, temperature=1.0)
  if arg.num_steps:
    steps = arg.num_steps
    c.optimizer.warmup_steps = max(1, min(10_000, steps // 10))
    c.train.update(num_steps=steps, log_every=max(1, steps // 100),
                   eval_every=max(1, steps // 5), checkpoint_every=max(1, steps // 5))
  c.lock()
  return c
