"""Fine-tuning an encoder (BERT, RoBERTa, an imported checkpoint) on a classification task.

  python train.py --config=configs/bert_finetune.py:task=paraphrase,init_from=workdirs/bert \
      --workdir=workdirs/bert-paraphrase
  python train.py --config=configs/bert_finetune.py:task=glue/stsb,init_from=workdirs/minilm ...

`init_from` is a workdir of ours (a BERT, RoBERTa or ELECTRA pretraining run — ELECTRA's
discriminator is fine-tuned, its generator dropped — or a Hugging Face checkpoint imported
with `python -m hf.convert import`): the model's and the tokenizer's settings are read from
its config.json, so they cannot disagree, and the encoder starts from its latest checkpoint
(or the one at `init_step`; training/loop.py `init_from`); the classifier head starts
fresh. Without `init_from` the encoder is configs/bert.py's at `size`, from scratch (a
baseline for what pretraining brings).

The recipe is Devlin et al. 2019 §4 as run: AdamW, weight decay 0.01, warmup over the first
10% of the steps then linear decay to 0, dropout 0.1, a few epochs. A task with a real-valued
label (glue/stsb) trains a one-output regression head with the mean squared error.
"""

import dataclasses
import json
import os

import ml_collections

from configs import bert
from configs import common
from data import tasks
from models import electra

# Model and data fields a fine-tuning run takes from its pretraining run.
_TOKENIZER_FIELDS = ('name', 'text_key', 'files', 'tokenizer', 'tokenizer_path', 'vocab_size')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, task='paraphrase', init_from='', init_step=0, size='tiny',
                         pooling='cls', epochs=3.0, batch_size=32, learning_rate=1e-4, seed=0)
  task = tasks.get_task(arg.task)
  if not hasattr(task, 'num_classes'):
    raise ValueError(f'task={arg.task!r} is a pretraining task; fine-tune on one of '
                     f'{sorted(n for n, t in tasks.TASKS.items() if hasattr(t, "num_classes"))}')
  c = bert.get_config(f'size={arg.size}')
  c.unlock()
  if arg.init_from:
    _take_model_and_tokenizer(c, arg.init_from)
  c.data.task = arg.task
  c.data.batch_size = arg.batch_size
  c.data.dupe_factor = 0

  c.model_name = 'bert_classifier'
  c.model.num_labels = task.num_classes or 1
  c.model.pooling = arg.pooling
  c.model.dropout_rate = 0.1
  c.objective = 'classification' if task.num_classes else 'regression'
  c.objective_settings = {}

  # Steps from epochs over the task's training split (examples are built once, cached).
  examples = len(task.split_examples(os.environ.get('CONTEXTUAL_DATA_DIR') or '.data', 'train'))
  num_steps = max(1, round(arg.epochs * examples / arg.batch_size))
  c.optimizer.update(learning_rate=arg.learning_rate, warmup_steps=max(1, num_steps // 10),
                     decay='linear', end_learning_rate_factor=0.0, weight_decay=0.01)
  c.train.update(num_steps=num_steps, log_every=max(1, num_steps // 50),
                 eval_every=max(1, num_steps // 4), checkpoint_every=max(1, num_steps // 4),
                 eval_batches=0)
  c.train.init_from = arg.init_from
  c.train.init_step = arg.init_step  # 0: the latest checkpoint of init_from
  c.seed = arg.seed
  c.lock()
  return c


def _take_model_and_tokenizer(c: ml_collections.ConfigDict, workdir: str) -> None:
  """Copies the encoder's and tokenizer's settings of the run in `workdir` into `c`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'init_from={workdir!r}: no {path} (a workdir of train.py or of '
                            '`python -m hf.convert import`)')
  with open(path) as f:
    source = json.load(f)
  model_name = source.get('model_name')
  if model_name not in ('bert', 'bert_classifier', 'electra'):
    raise ValueError(f'init_from={workdir!r} holds a {model_name!r} model; '
                     'fine-tuning here starts from a BERT-family encoder (bert, electra)')
  if model_name == 'electra':
    # ELECTRA keeps its discriminator: a BERT without MLM head (models/electra.py).
    encoder_fields = dataclasses.asdict(electra.ElectraConfig(**source['model']).discriminator)
  else:
    encoder_fields = {k: v for k, v in source['model'].items()
                      if k not in ('num_labels', 'pooling')}
  c.model = encoder_fields  # plain values: the source's seq_len reference is not kept
  c.data.seq_len = source['data']['seq_len']
  for field in _TOKENIZER_FIELDS:
    if field in source['data']:
      c.data[field] = source['data'][field]
