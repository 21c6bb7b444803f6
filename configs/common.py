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
