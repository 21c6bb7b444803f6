"""Four questions about encoder pretraining, each a sweep of small pretraining runs whose
every model is then fine-tuned on corpus tasks (studies/pretraining_study.py runs it all):

  masking          static vs dynamic masking (RoBERTa, Liu et al. 2019, table 1)
  nsp              NSP on vs off, segment pairs vs full sentences (RoBERTa, table 2)
  electra_compute  ELECTRA vs BERT-MLM at equal pretraining FLOPs (Clark et al. 2020, fig. 1)
  generator_size   ELECTRA's generator at 1/8, 1/4, 1/2, 1x the discriminator's width (fig. 3)

  python -m studies.pretraining_study --study=masking --workdir=workdirs/study-masking
  python train.py --config=configs/pretraining_studies.py:family=electra,generator=0.5 ...

Every point is one of three families at one size (`SIZE`, a few minutes per run on 2 CPU
cores), from configs/bert.py and configs/electra.py with their recipes unchanged:
  bert     MLM (80/10/10) + NSP on segment pairs: `nsp=false` drops the NSP loss (the pairs
           stay), `task=full_sentences` packs contiguous sentences instead (RoBERTa);
  mlm      MLM alone on full sentences (RoBERTa's recipe; the BERT side of ELECTRA's
           comparison, as the ELECTRA paper trains it without NSP);
  electra  generator MLM (85/15) + 50 x replaced-token detection on full sentences.
The masking study repeats a small slice of the corpus (`train_examples`) for 8 epochs, so
that BERT's static masks (`dupe_factor=2`: each mask seen 4 times, as RoBERTa's 10 copies
over 40 epochs) meet repetition at all; the other studies train on the whole corpus.
"""

import ml_collections

from configs import bert
from configs import common
from configs import electra

# The study size: every point pretrains this model for `num_steps` steps.
SIZE = dict(num_layers=2, num_heads=2, embed_dim=64, mlp_dim=256, seq_len=64,
            vocab_size=2048, batch_size=32, num_steps=400, learning_rate=1e-3)
SEEDS = (0, 1, 2)
# Fine-tuning of every pretrained point (configs/bert_finetune.py), on each task, scored by
# the test split's Matthews correlation (0 = chance, whatever the class balance).
# Calibrated on one ELECTRA point of this size: `translation` (KJV or WEB?) reached test
# MCC 0.84 in half an epoch (0.76 from scratch), `genre` 0.23 in one epoch; `paraphrase`
# stayed at chance (accuracy 0.504) after a whole epoch at this size, so it is left out.
FINETUNE = dict(tasks=('translation', 'genre'), epochs=0.5, batch_size=32, learning_rate=1e-3)

# study -> {variant: get_config argument}; seeds are added by `sweep`.
STUDIES = {
    'masking': {
        'static': 'family=bert,dupe_factor=2,train_examples=1600',
        'dynamic': 'family=bert,train_examples=1600',
    },
    'nsp': {
        'pairs+nsp': 'family=bert',
        'pairs-nsp': 'family=bert,nsp=false',
        'full_sentences-nsp': 'family=bert,nsp=false,task=full_sentences',
    },
    'electra_compute': {
        'electra': 'family=electra',
        'bert_mlm': 'family=mlm',
    },
    'generator_size': {
        f'generator-{fraction}': f'family=electra,generator={fraction}'
        for fraction in (0.125, 0.25, 0.5, 1.0)
    },
}
# The question each study asks, and what the paper reports (for the study's page).
QUESTIONS = {
    'masking': "Static masks (BERT: each example's mask fixed in the data, `dupe_factor` "
               'copies) or dynamic ones (RoBERTa: a new mask every time a sentence is seen)? '
               'Liu et al. 2019, table 1, report dynamic masking comparable to or slightly '
               'better than static.',
    'nsp': 'Does next-sentence prediction help? Liu et al. 2019, table 2, report that dropping '
           'the NSP loss matches or improves downstream scores, and that full-sentence inputs '
           'beat segment pairs.',
    'electra_compute': 'Is replaced-token detection more compute-efficient than masked LM? '
                       'Clark et al. 2020 (fig. 1, sec. 3.4) report ELECTRA ahead of MLM '
                       'at every compute budget, most at small ones. Curves: each run is '
                       'fine-tuned from its checkpoints at 1/4, 1/2 and all of its steps.',
    'generator_size': 'How large should the generator be? Clark et al. 2020, fig. 3, find '
                      'generators 1/4 to 1/2 of the discriminator\'s width best, and an equal '
                      'one worse (and twice the compute).',
}
# electra_compute: each run is fine-tuned from these fractions of its steps too, for the
# score-against-FLOPs curves.
CURVE_FRACTIONS = {'electra_compute': (0.25, 0.5, 1.0)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, family='bert', nsp=True, task='', dupe_factor=0,
                         train_examples=0, generator=0.25, seed=0, num_steps=SIZE['num_steps'])
  if arg.family == 'electra':
    c = electra.get_config(f'size=tiny,generator={arg.generator}')
  elif arg.family in ('bert', 'mlm'):
    c = bert.get_config('size=tiny')
  else:
    raise ValueError(f'config argument family={arg.family!r} is not one of bert, mlm, electra')
  c.unlock()
  c.seed = arg.seed
  c.data.seed = arg.seed
  c.data.update(vocab_size=SIZE['vocab_size'], seq_len=SIZE['seq_len'],
                batch_size=SIZE['batch_size'], dupe_factor=arg.dupe_factor,
                train_examples=arg.train_examples)
  c.model.update({k: SIZE[k] for k in ('num_layers', 'num_heads', 'embed_dim', 'mlp_dim')})
  if arg.family == 'mlm' or (arg.family == 'bert' and not arg.nsp):
    c.objective = 'masked_lm'
    c.objective_settings = dict(rate=0.15, mask_fraction=0.8, random_fraction=0.1,
                                whole_word=False)
    c.model.next_sentence = False
  if arg.family == 'mlm':
    c.data.task = 'full_sentences'
  if arg.task:
    c.data.task = arg.task
  steps = arg.num_steps
  c.optimizer.update(learning_rate=SIZE['learning_rate'], warmup_steps=max(1, steps // 10))
  c.train.update(num_steps=steps, log_every=max(1, steps // 50), eval_every=steps,
                 checkpoint_every=max(1, steps // 4), keep_checkpoints=4, eval_batches=20)
  c.lock()
  return c


def sweep(arg: str | None = None) -> dict[str, str]:
  """The pretraining points of one study: {'<variant>-s<seed>': get_config argument}."""
  arg = common.parse_arg(arg, study='masking', seeds=len(SEEDS), num_steps=SIZE['num_steps'])
  variants = common.pick(STUDIES, arg.study, 'study')
  return {f'{variant}-s{seed}': f'{point},seed={seed},num_steps={arg.num_steps}'
          for variant, point in variants.items() for seed in SEEDS[:arg.seeds]}
