"""Helpers shared by the config files."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `--config=configs/x.py:key=value,key2=value2` into a locked ConfigDict.

  Every key must be one of `defaults`, and each value takes the type of its default, so a
  typo or a bad value fails here with the key's name rather than deep inside a run.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'config argument {item!r} is not of the form key=value '
                       f'(known keys: {", ".join(sorted(defaults))})')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r} (known keys: {", ".join(sorted(defaults))})')
    kind = type(defaults[key])
    try:
      result[key] = _convert(value, kind)
    except ValueError as e:
      raise ValueError(f'config argument {key}={value!r}: expected {kind.__name__}') from e
  return ml_collections.ConfigDict(result.to_dict())


def _convert(value: str, kind: type):
  if kind is bool:
    if value.lower() in ('1', 'true', 'yes'):
      return True
    if value.lower() in ('0', 'false', 'no'):
      return False
    raise ValueError(value)
  return kind(value)


def pick(table: dict, key: str, what: str):
  """`table[key]`, or an error listing the choices (e.g. an unknown `size=`)."""
  if key not in table:
    raise ValueError(f'unknown {what} {key!r}; choose one of {", ".join(table)}')
  return table[key]


def pretraining_train(num_steps: int, *, tiny: bool) -> dict:
  """The `train` block of the encoder-decoder pretraining configs (T5, BART, the prefix
  LM): 4 evaluations and checkpoints, ~100 log lines; tiny runs evaluate 4 batches."""
  return dict(
      num_steps=num_steps,
      log_every=max(1, num_steps // 100),
      eval_every=max(1, num_steps // 4),
      eval_batches=4 if tiny else 20,
      checkpoint_every=max(1, num_steps // 4),
      keep_checkpoints=2,
      microbatches=1,
      on_nonfinite='stop',
      preemption_grace_seconds=120.0,
  )


def stack_settings(*, mask: str, **overrides) -> dict:
  """The attention, position and memory settings of the shared stack
  (models/transformer.py) that every family's `config.model` carries, each overridable
  by name (`--config.model.position=rope`). `mask` is the family's dense default."""
  settings = dict(
      # Attention variants, by name (models/attention.py, models/positions.py):
      attention='scaled_dot',  # score: scaled_dot | dot | general (Luong) | additive (Bahdanau)
      kernel='xla',            # xla (einsum) | cudnn (fused) | block_sparse
      mask=mask,               # decoders: causal | sliding_window | bigbird | prefix_lm;
                               # encoders: bidirectional | sliding_window | bigbird
      position='learned',      # none | learned | sinusoidal | shaw | t5 | rope | alibi | deberta
      relative_window=16,      # shaw: clipping distance k
      relative_buckets=32,     # t5, deberta
      relative_max_distance=128,
      rope_base=10000.0,
      sinusoid_scale=0.02,     # sinusoidal: amplitude, matched to the embeddings' init
      sinusoid_layout='interleaved',  # sinusoidal: sin, cos pairs (the paper's PE(p, 2i),
                               # PE(p, 2i+1)) | concatenated: [sin ... | cos ...] (Marian)
      window=0,                # sliding_window: slots each query sees
      block_size=0,            # bigbird / block_sparse tiles
      window_blocks=1, global_blocks=1, random_blocks=1, mask_seed=0,
      remat='none',            # none | full | save_dots: recompute activations in backward
      scan_layers=False,       # nn.scan over the layers (parameters gain a 'layers' axis)
  )
  unknown = set(overrides) - set(settings)
  if unknown:
    raise ValueError(f'stack_settings: unknown settings {sorted(unknown)}')
  return {**settings, **overrides}


# Device mesh; -1 takes the remaining devices. Logical axis names map onto mesh axes:
# data-parallel over 'data', parameters and optimizer state sharded over 'fsdp' (ZeRO-3
# style, gathered per layer), Megatron-style tensor parallelism over 'tensor'. A logical
# name whose mesh axis is already used in the same array stays unsharded, so activations
# keep 'embed' whole while the batch is split over data and fsdp.
MESH = dict(shape=(-1, 1, 1), axes=('data', 'fsdp', 'tensor'))
LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('classes', None),
    ('length', None),
    ('kv', None),
    ('layers', None),
)
