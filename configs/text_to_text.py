"""T5's text-to-text fine-tuning (Raffel et al. 2020 §2.4, §3.5): several tasks, each
opened by its prefix, mixed into one training stream; each task evaluated with its own
metric from one checkpoint.

  python train.py --workdir=workdirs/t5-mixture \
      --config=configs/text_to_text.py:init_from=workdirs/t5,mixture=translate+modernize
  python eval.py --workdir=workdirs/t5-mixture --splits=test    # a row per (split, task)

Arguments:
  init_from   a pretraining workdir of an encoder-decoder (configs/t5.py, configs/bart.py,
              or another text-to-text run): config.model and the tokenizer (its
              sentencepiece model, as `data.tokenizer_path`) come from its config.json, so
              they cannot disagree, and all parameters start from its latest checkpoint (or
              `init_step`'s). Empty: a from-scratch encoder-decoder of configs/translation.py
              at `size` with a vocabulary trained on the mixture's texts (the baseline for
              what pretraining brings).
  mixture     tasks of data/text_to_text.py TASKS joined by '+' (translate, translate_es_en,
              modernize, genre)
  mixing      'proportional' (examples-proportional, capped at `cap` examples per task;
              0: no cap) or weights 'translate=1+modernize=3'
  steps, batch_size, learning_rate   0: the recipe's (below)
  seed, size  size: tiny | small | base (the baseline's model; rows, batch and steps)

Recipe as run: the seq2seq objective with label smoothing 0.1; from scratch, the
Transformer's schedule (configs/translation.py: Adam, warmup, inverse square-root decay);
from a pretrained model, T5's fine-tuning schedule: a constant learning rate (1e-3, after a
warmup over the first 5% of the steps, which Adam's fresh moments want). Beam 4 with length
penalty 0.6 decodes each task's outputs; with a size other than tiny, the first 100
validation examples of every task are scored at each evaluation.
"""

import json
import os

import ml_collections

from configs import common
from configs import translation
from data import pipeline

SIZES = translation.SIZES  # the from-scratch baseline's (and every run's rows, batch, steps)
_FINE_TUNING_LEARNING_RATE = 1e-3


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, init_from='', init_step=0, mixture='translate+modernize+genre',
                         mixing='proportional', cap=0, steps=0, batch_size=0,
                         learning_rate=0.0, seed=0, size='tiny')
  c = translation.get_config(f'size={arg.size}')
  c.unlock()
  # '+' in the argument (whose items ',' separates); ',' in config.data, as the pipeline
  # documents it (it reads both).
  c.data.update(task='text_to_text', name='', source_key='', target_key='', files='',
                seed=arg.seed)
  c.data.tokenizer_path = ''  # '': a vocabulary trained on the mixture's texts
  c.data.mixture = arg.mixture.replace('+', ',')
  c.data.mixing = arg.mixing.replace('+', ',')
  c.data.mixing_cap = arg.cap
  if arg.batch_size:
    c.data.batch_size = arg.batch_size
  num_steps = arg.steps or c.train.num_steps
  if arg.init_from:
    _take_model_and_tokenizer(c, arg.init_from)
    c.optimizer.update(learning_rate=arg.learning_rate or _FINE_TUNING_LEARNING_RATE,
                       decay='constant', warmup_steps=max(1, num_steps // 20))
  elif arg.learning_rate:
    c.optimizer.learning_rate = arg.learning_rate
  c.translate.update(max_len=c.data.targets_len, eval_examples=0 if arg.size == 'tiny' else 100)
  c.train.update(num_steps=num_steps, log_every=max(1, num_steps // 100),
                 eval_every=max(1, num_steps // 5), checkpoint_every=max(1, num_steps // 5))
  c.train.init_from = arg.init_from
  c.train.init_step = arg.init_step  # 0: the latest checkpoint of init_from
  c.seed = arg.seed
  c.lock()
  return c


def _take_model_and_tokenizer(c: ml_collections.ConfigDict, workdir: str) -> None:
  """Copies the model and the tokenizer of the encoder-decoder run in `workdir` into `c`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'init_from={workdir!r}: no {path} (a workdir of train.py)')
  with open(path) as f:
    source = json.load(f)
  if source.get('model_name') != 'encoder_decoder':
    raise ValueError(f'init_from={workdir!r} holds a {source.get("model_name")!r} model; '
                     "text-to-text fine-tuning starts from an 'encoder_decoder' (T5, BART)")
  data = source['data']
  if data.get('tokenizer', 'bpe') not in ('bpe', 'unigram'):
    raise ValueError(f'init_from={workdir!r}: its tokenizer {data["tokenizer"]!r} is not a '
                     'sentencepiece model (bpe, unigram), which tokenizer_path loads')
  c.model = source['model']  # plain values: the sentinels stay in its vocab_size
  # The run's own sentencepiece file: named, or the one it trained (cached by data/pipeline).
  tokenizer_path = data.get('tokenizer_path') or pipeline.load_tokenizer(
      pipeline.DataConfig(**data)).path
  c.data.update(tokenizer=data.get('tokenizer', 'bpe'), vocab_size=data['vocab_size'],
                tokenizer_path=os.path.abspath(tokenizer_path))
  # Rows as long as the pretraining's inputs, on both sides: its positions reach that far.
  length = data['seq_len']
  if length > c.model.max_len:
    raise ValueError(f'init_from={workdir!r}: its rows of seq_len={length} exceed its '
                     f'model.max_len={c.model.max_len}')
  c.data.update(seq_len=length, targets_len=length)
