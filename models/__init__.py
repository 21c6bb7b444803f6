"""Model families by name: `config_cls, model_cls = models.get('gpt')`."""

from models import block_sparse  # pylint: disable=unused-import  (registers its kernel)
from models import bert
from models import gpt

MODELS = {
    'gpt': (gpt.GPTConfig, gpt.GPT),
    'bert': (bert.BertConfig, bert.BERT),  # RoBERTa too: a preset of the config
    'bert_classifier': (bert.BertClassifierConfig, bert.BertClassifier),
}


def get(name: str) -> tuple[type, type]:
  """The (config dataclass, Flax module) pair registered as `name`."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r} (known: {", ".join(sorted(MODELS))})')
  return MODELS[name]
