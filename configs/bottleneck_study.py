"""The bottleneck study: does a fixed-size context degrade translation of long sentences,
and does attention remove that? (Bahdanau et al. 2015, fig. 2.)

  python -m studies.bottleneck_study --workdir=workdirs/study-bottleneck
  python train.py --config=configs/bottleneck_study.py:variant=rnn_bahdanau,seed=1 --workdir=...

Four models trained for the same number of steps on the same English -> Spanish batches
(bible/en_es): an LSTM encoder-decoder whose only bridge is the encoder's final state
(Sutskever et al. 2014), the same with Bahdanau's additive attention, the same with Luong's
general attention and input feeding, and the Transformer (configs/translation.py's block).
Each is scored by test BLEU overall and by source length (studies/bottleneck_study.py).
"""

import ml_collections

from configs import common
from configs import translation

VARIANTS = ('rnn_none', 'rnn_bahdanau', 'rnn_luong', 'transformer')
SEEDS = (0, 1, 2)
# Sized for about an hour for all 12 runs on 2 CPU cores: every model is 128 wide, and 600
# steps (an RNN trains at ~3 steps/s here, so 1200 steps made 12 runs take ~1.5 h).
SIZE = dict(vocab_size=4000, seq_len=80, batch_size=32, num_steps=600, width=128,
            learning_rate=2e-3, warmup_steps=100)
# RNNs: one bidirectional LSTM layer encoding, one LSTM layer decoding (Bahdanau's layout,
# smaller); the same encoder and decoder in all three, only the bridge differs.
RNNS = {
    'rnn_none': dict(attention='none', luong_score='general', input_feeding=False),
    'rnn_bahdanau': dict(attention='bahdanau', luong_score='general', input_feeding=False),
    'rnn_luong': dict(attention='luong', luong_score='general', input_feeding=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='transformer', seed=0, num_steps=SIZE['num_steps'])
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown variant {arg.variant!r}; choose one of {", ".join(VARIANTS)}')
  c = translation.get_config('size=small')
  c.unlock()
  c.seed = arg.seed
  c.data.update(vocab_size=SIZE['vocab_size'], seq_len=SIZE['seq_len'],
                targets_len=SIZE['seq_len'], batch_size=SIZE['batch_size'], seed=arg.seed)
  if arg.variant == 'transformer':
    c.model.update(num_layers=2, num_heads=4, embed_dim=SIZE['width'],
                   mlp_dim=2 * SIZE['width'], max_len=SIZE['seq_len'])
  else:
    c.model_name = 'rnn_seq2seq'
    c.model = dict(
        vocab_size=SIZE['vocab_size'], max_len=SIZE['seq_len'],
        embed_dim=SIZE['width'], hidden_dim=SIZE['width'], num_layers=1, cell='lstm',
        bidirectional=True, dropout_rate=0.1, share_embeddings=True, dtype='float32',
        param_dtype='float32', init_range=0.1, recurrent_init='orthogonal',
        **RNNS[arg.variant])
  c.optimizer.update(learning_rate=SIZE['learning_rate'], warmup_steps=SIZE['warmup_steps'])
  c.translate.update(max_len=SIZE['seq_len'], eval_examples=0)  # the study scores the test split
  c.train.update(num_steps=arg.num_steps, log_every=max(1, arg.num_steps // 50),
                 eval_every=arg.num_steps, checkpoint_every=max(1, arg.num_steps // 4))
  c.lock()
  return c


def sweep(arg: str | None = None) -> dict[str, str]:
  """{'<variant>-s<seed>': get_config argument} for every variant and seed."""
  extra = f',{arg}' if arg else ''
  return {f'{variant}-s{seed}': f'variant={variant},seed={seed}{extra}'
          for variant in VARIANTS for seed in SEEDS}
