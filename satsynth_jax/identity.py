"""Run identity: every trained model and every record set keeps the resolved config that made it.

`<dir>/config.json` holds {"shaping": the settings that shape the output, "config": the whole
resolved config}. A job that writes into an existing run or set, or reads one, compares the
shaping settings it expects with the recorded ones and stops with one line naming each
differing key and both values, so no number is ever reported under settings other than its
own. Inference rebuilds models from the recorded "config", so a user need not retype the
overrides a model was trained with.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping

import ml_collections

from satsynth_jax import atomic
from satsynth_jax.errors import SatSynthError

CONFIG_FILE = "config.json"


class SettingsMismatchError(SatSynthError, ValueError):
  """An existing run or set was made with other settings; the message names each key and both values."""


def _plain(value):
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def flatten(config) -> dict:
  """{"data.image_size": 128, "diffusion.model.ch_mult": [1, 1, 2], ...}: JSON-ready dotted keys."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        walk(value, name + ".")
      else:
        out[name] = _plain(value)

  walk(config, "")
  return out


def select(config, keys: Iterable[str]) -> dict:
  """The listed settings of `config`; a key naming a section ("diffusion.model") takes all of it."""
  flat = flatten(config)
  out = {}
  for key in keys:
    matched = {k: v for k, v in flat.items() if k == key or k.startswith(key + ".")}
    if not matched:
      raise KeyError(f"no config setting {key!r}")
    out.update(matched)
  return out


def path(directory) -> pathlib.Path:
  return pathlib.Path(directory) / CONFIG_FILE


def read(directory) -> dict | None:
  """The recorded {"shaping", "config"} of a run or set, None when it has none."""
  try:
    with open(path(directory), encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise SettingsMismatchError(f"{path(directory)}: unreadable ({e}); delete the run or set to redo it") from e


def recorded_config(directory) -> ml_collections.ConfigDict | None:
  """The whole config a run or set was made with, as a ConfigDict (lists for tuples); None if unrecorded."""
  recorded = read(directory)
  if recorded is None:
    return None
  nested: dict = {}
  for key, value in recorded["config"].items():
    node = nested
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return ml_collections.ConfigDict(nested)


def differences(recorded: Mapping, expected: Mapping) -> list[str]:
  """"key: recorded -> expected" for every shaping key whose values differ (or that one side lacks)."""
  keys = sorted(set(recorded) | set(expected))
  missing = "(unset)"
  return [f"{k}: {recorded.get(k, missing)!r} -> {expected.get(k, missing)!r}"
          for k in keys if recorded.get(k, missing) != expected.get(k, missing)]


def check(directory, shaping: Mapping, what: str, remedy: str) -> bool:
  """True when `directory` records exactly `shaping`; False when it records nothing; else one-line error."""
  recorded = read(directory)
  if recorded is None:
    return False
  diff = differences(recorded["shaping"], _plain_dict(shaping))
  if diff:
    raise SettingsMismatchError(f"{directory}: {what} was made with other settings ({'; '.join(diff)}); {remedy}")
  return True


def record(directory, config, shaping: Mapping) -> pathlib.Path:
  """Write (atomically) the run's or set's config.json."""
  os.makedirs(directory, exist_ok=True)
  return atomic.write_json(path(directory), {"shaping": _plain_dict(shaping), "config": flatten(config)})


def ensure(directory, config, shaping: Mapping, what: str, remedy: str, *, write: bool = True) -> None:
  """Refuse a run or set made with other settings; record the settings of a new one (when `write`)."""
  if not check(directory, shaping, what, remedy) and write:
    record(directory, config, shaping)


def _plain_dict(shaping: Mapping) -> dict:
  return {k: _plain(v) for k, v in shaping.items()}
