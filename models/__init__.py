"""Model families by name: `config_cls, model_cls = models.get('gpt')`."""

from models import block_sparse  # pylint: disable=unused-import  (registers its kernel)
from models import bert
from models import deberta
from models import electra
from models import encoder_decoder
from models import gpt
from models import rnn_seq2seq

MODELS = {
    'gpt': (gpt.GPTConfig, gpt.GPT),
    'bert': (bert.BertConfig, bert.BERT),  # RoBERTa too: a preset of the config
    'bert_classifier': (bert.BertClassifierConfig, bert.BertClassifier),
    'deberta': (deberta.DebertaConfig, deberta.DeBERTa),
    'electra': (electra.ElectraConfig, electra.Electra),
    'encoder_decoder': (encoder_decoder.EncoderDecoderConfig, encoder_decoder.EncoderDecoder),
    'rnn_seq2seq': (rnn_seq2seq.RNNSeq2SeqConfig, rnn_seq2seq.RNNSeq2Seq),
}

# What a fine-tuning run (`config.train.init_from`) takes from a pretraining run's
# parameters, by the source's model name: ELECTRA keeps its discriminator alone.
ENCODER_PARAMS = {
    'electra': electra.discriminator_params,
}


def encoder_params(name: str, params):
  """The parameters of model `name` that a fine-tuned encoder starts from."""
  return ENCODER_PARAMS.get(name, lambda p: p)(params)


def get(name: str) -> tuple[type, type]:
  """The (config dataclass, Flax module) pair registered as `name`."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r} (known: {", ".join(sorted(MODELS))})')
  return MODELS[name]
