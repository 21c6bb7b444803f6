"""Reading and writing Hugging Face model directories: config.json + model.safetensors only.

`load_hf_dir` never unpickles: a directory with only pytorch_model.bin is refused (convert
it to safetensors with transformers first). `save_hf_dir` writes what
`transformers.AutoModel.from_pretrained(dir)` loads offline, plus the tokenizer if given.
"""

import json
import os
import pathlib
from typing import Any, Mapping, NamedTuple

import numpy as np
import safetensors.numpy

from data import subword
from hf import bert as hf_bert
from hf import deberta as hf_deberta
from hf import electra as hf_electra
from models import bert
from models import deberta
from models import electra

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
# The tokenizer files a published model directory may hold (data/subword.py reads them).
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'vocab.json', 'merges.txt',
                   'tokenizer_config.json', 'special_tokens_map.json')


class Imported(NamedTuple):
  """An imported HF directory: its family (a key of hf.convert.FAMILY_CONFIGS), our config
  fields, our param tree, the tokenizer files found beside them, and the parts the
  checkpoint lacked (initialised fresh)."""
  family: str
  fields: dict[str, Any]
  params: dict
  tokenizer_files: tuple[pathlib.Path, ...]
  fresh: tuple[str, ...]


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no config.json in the HF model directory')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def tokenizer_files(directory: str | os.PathLike) -> tuple[pathlib.Path, ...]:
  """The TOKENIZER_FILES that `directory` holds."""
  directory = pathlib.Path(directory)
  return tuple(directory / name for name in TOKENIZER_FILES if (directory / name).is_file())


def read_safetensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict of `directory`/model.safetensors (no pickles, ever)."""
  directory = pathlib.Path(directory)
  path = directory / WEIGHTS
  if not path.is_file():
    found = sorted(p.name for p in directory.glob('*.bin')) + sorted(
        p.name for p in directory.glob('model-*.safetensors'))
    hint = (f' It holds {found}: convert pickled weights to {WEIGHTS} with transformers '
            '(`model.save_pretrained(dir)`) first; pickles are never loaded here, and '
            'sharded safetensors are not read.' if found else '')
    raise FileNotFoundError(f'{path}: no {WEIGHTS}.{hint}')
  return safetensors.numpy.load_file(os.fspath(path))


def load_hf_dir(directory: str | os.PathLike, *, generator_dir: str | os.PathLike | None = None,
                scan_layers: bool = False, seed: int = 0) -> Imported:
  """Imports an HF BERT/RoBERTa/ELECTRA/DeBERTa-v2 directory (config.json + model.safetensors).

  ELECTRA: `directory` is the discriminator's (ElectraForPreTraining), `generator_dir` the
  generator's (ElectraForMaskedLM; without it the generator starts fresh). `scan_layers`
  picks our layout (and is set in the returned fields); parts the checkpoint lacks are
  initialised from `seed` and named in `fresh`.
  """
  directory = pathlib.Path(directory)
  hf_config = read_config(directory)
  found = tokenizer_files(directory)
  if hf_config.get('model_type') == 'electra':
    generator = None if generator_dir is None else read_config(generator_dir)
    fields = {**hf_electra.config_from_hf(hf_config, generator), 'scan_layers': scan_layers}
    params, fresh = hf_electra.params_from_hf(
        read_safetensors(directory),
        None if generator_dir is None else read_safetensors(generator_dir),
        electra.ElectraConfig(**fields), seed=seed)
    return Imported('electra', fields, params, found, fresh)
  if generator_dir is not None:
    raise ValueError(f'--generator_dir is for ELECTRA; {directory} holds a '
                     f'{hf_config.get("model_type")!r} model')
  if hf_config.get('model_type') == hf_deberta.MODEL_TYPE:
    fields = {**hf_deberta.config_from_hf(hf_config), 'scan_layers': scan_layers}
    params, fresh = hf_deberta.params_from_hf(read_safetensors(directory),
                                              deberta.DebertaConfig(**fields), seed=seed)
    return Imported('deberta', fields, params, found, fresh)
  fields = {**hf_bert.config_from_hf(hf_config), 'scan_layers': scan_layers}
  params, fresh = hf_bert.params_from_hf(read_safetensors(directory),
                                         bert.BertConfig(**fields), seed=seed)
  return Imported(hf_bert.model_type_of(bert.BertConfig(**fields)), fields, params,
                  found, fresh)


def save_hf_dir(directory: str | os.PathLike, config: bert.BertConfig | deberta.DebertaConfig,
                params: Mapping[str, Any],
                tokenizer: subword.SubwordTokenizer | None = None) -> list[pathlib.Path]:
  """Writes config.json + model.safetensors (+ the tokenizer's files); returns the paths.

  BERT/RoBERTa or DeBERTa-v2, by the config's class (ELECTRA writes two directories:
  hf/electra.py `save_hf_dirs`)."""
  family = hf_deberta if isinstance(config, deberta.DebertaConfig) else hf_bert
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = family.config_to_hf(config)
  state = family.params_to_hf(params, config)
  weights = directory / WEIGHTS
  # transformers checks the 'format' metadata; 'pt' says the names are PyTorch's.
  safetensors.numpy.save_file(state, os.fspath(weights), metadata={'format': 'pt'})
  config_path = directory / CONFIG
  config_path.write_text(json.dumps(hf_config, indent=2) + '\n', encoding='utf-8')
  files = [config_path, weights]
  if tokenizer is not None:
    files += tokenizer.save_pretrained(directory)
  return files
