"""Run identity: every trained model and every record set keeps the resolved config that made it.

`<dir>/config.json` holds {"shaping": the settings that shape the output, "config": the whole
resolved config}. A job that writes into an existing run or set, or reads one, compares the
shaping settings it expects with the recorded ones and stops with one line naming each
differing key and both values, so no number is ever reported under settings other than its
own. Inference rebuilds models from the recorded "config", so a user need not retype the
overrides a model was trained with. A config.json that is damaged (unparsable, or lacking
either object) is refused in one line, never read as "unrecorded"; so is a missing one beside
outputs it described (checkpoints, shards): nothing is re-recorded from a later command.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping

import ml_collections

from satsynth_jax.infra import atomic
from satsynth_jax.infra.errors import SatSynthError

CONFIG_FILE = "config.json"


class SettingsMismatchError(SatSynthError, ValueError):
  """An existing run or set was made with other settings; the message names each key and both values."""


class UnrecordedError(SatSynthError, ValueError):
  """A config.json that is damaged, or missing beside outputs it should describe; the message names it."""


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
  """The recorded {"shaping", "config"} of a run or set, None when it has none; a damaged file is refused."""
  try:
    with open(path(directory), encoding="utf-8") as f:
      recorded = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UnrecordedError(f"{path(directory)}: unreadable ({e}); {_restore_or_delete(directory)}") from e
  if not (isinstance(recorded, dict) and all(isinstance(recorded.get(key), dict) for key in ("shaping", "config"))):
    raise UnrecordedError(f"{path(directory)}: damaged (it needs a \"shaping\" and a \"config\" object); "
                          f"{_restore_or_delete(directory)}")
  return recorded


def read_existing(directory, what: str) -> dict | None:
  """read(), refusing a directory that holds outputs but no config.json: their settings are unknown, and
  recording this command's settings in their place would vouch for outputs made under any others."""
  recorded = read(directory)
  if recorded is None and (outputs := _outputs(directory)):
    raise UnrecordedError(f"{path(directory)} is missing, but {directory} holds {what} ({', '.join(outputs[:3])}"
                          f"{', ...' if len(outputs) > 3 else ''}), made with settings no longer recorded; "
                          f"{_restore_or_delete(directory)}")
  return recorded


def _outputs(directory) -> list[str]:
  """What `directory` holds besides its config.json (hidden temp files aside); [] if it does not exist."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return []
  return sorted(name for name in names if name != CONFIG_FILE and not name.startswith("."))


def _restore_or_delete(directory) -> str:
  return f"restore {CONFIG_FILE} from a backup, or delete {directory} to redo what it holds"


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
  return _matches(directory, read(directory), shaping, what, remedy)


def compare(directory, recorded: Mapping, expected: Mapping, what: str, remedy: str) -> None:
  """Refuse, naming each differing key with both values, when `recorded` shaping differs from `expected`."""
  diff = differences(recorded, _plain_dict(expected))
  if diff:
    raise SettingsMismatchError(f"{directory}: {what} was made with other settings ({'; '.join(diff)}); {remedy}")


def _matches(directory, recorded: dict | None, shaping: Mapping, what: str, remedy: str) -> bool:
  if recorded is None:
    return False
  compare(directory, recorded["shaping"], shaping, what, remedy)
  return True


def record(directory, config, shaping: Mapping) -> pathlib.Path:
  """Write (atomically) the run's or set's config.json."""
  os.makedirs(directory, exist_ok=True)
  return atomic.write_json(path(directory), {"shaping": _plain_dict(shaping), "config": flatten(config)})


def ensure(directory, config, shaping: Mapping, what: str, remedy: str, *, write: bool = True) -> None:
  """Refuse a run or set made with other settings (or whose outputs lost their config.json); record the
  settings of a new one (when `write`)."""
  if not _matches(directory, read_existing(directory, f"outputs of {what}"), shaping, what, remedy) and write:
    record(directory, config, shaping)


def _plain_dict(shaping: Mapping) -> dict:
  return {k: _plain(v) for k, v in shaping.items()}
