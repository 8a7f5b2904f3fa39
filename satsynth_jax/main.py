"""Command line: `python -m satsynth_jax.main --config=configs/X.py --workdir=DIR --mode=MODE`.

Every job reads its inputs from and writes its outputs under --workdir (DESIGN.md).
Config overrides use ml_collections syntax: `--config.data.patch_size=128`.
Several hosts: every job but `prepare` joins a jax.distributed run first (satsynth_jax/distributed.py).
"""

from __future__ import annotations

import importlib
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from satsynth_jax import config_check
from satsynth_jax.errors import SatSynthError

# mode -> "module:function(config, workdir)"; imported lazily so `prepare` stays light.
MODES = {
    "prepare": "satsynth_jax.data.prepare:run",
    "train_diffusion": "satsynth_jax.train.diffusion:run",
    "train_sr": "satsynth_jax.train.super_resolution:run",
    "sample": "satsynth_jax.sample:run",
    "train_metric_encoder": "satsynth_jax.sample_quality:train_metric_encoder",
    "evaluate_samples": "satsynth_jax.sample_quality:run",
    "train_segmentation": "satsynth_jax.train.segmentation:run",
    "evaluate": "satsynth_jax.evaluate:run",
    "pipeline": "satsynth_jax.experiment:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the run.")
_MODE = flags.DEFINE_string("mode", None, f"Job to run: one of {', '.join(MODES)}.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Join a multi-process jax.distributed run: auto (when settings or a multi-host "
                                 "TPU slice are found), on (always; JAX detects TPU/SLURM clusters), off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: env SATSYNTH_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run, one per host (default: env SATSYNTH_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process, 0..num_processes-1 (default: env SATSYNTH_PROCESS_ID).")


def fail(message: str) -> None:
  """One line on stderr and a non-zero exit: what went wrong and what to change."""
  print(f"satsynth_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_key_message(error: Exception, argv) -> str | None:
  """Name the override whose key the config lacks, with ml_collections' suggestion."""
  text = str(error).replace("\\n", " ")
  match = re.search(r"'([A-Za-z0-9_]+)\\?'", text)
  if match is None:
    return None
  for arg in argv:
    key = arg.split("=", 1)[0]
    if key.startswith("--config.") and match.group(1) in key.split("."):
      hint = re.search(r'Did you mean "([^"]+)"', text)
      return f"unknown config key {key}" + (f" (did you mean {hint.group(1)}?)" if hint else "")
  return None


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing key
    fail(_unknown_key_message(e, argv) or f"bad command line: {e}")
  except flags.Error as e:  # absl: unparsable value, unknown flag
    fail(f"bad command line: {e}")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; all settings are flags")
  if _CONFIG.value is None:
    fail("--config is required, e.g. --config=configs/demo.py")
  if _MODE.value not in MODES:
    fail(f"unknown --mode={_MODE.value!r}; available modes: {', '.join(MODES)}")
  if not _WORKDIR.value:
    fail("--workdir is required: every output of the run goes under it")
  try:
    config = _CONFIG.value
    config_check.validate(config)
  except OSError as e:  # config_flags defers a missing or broken config file to first use
    fail(" ".join(str(e).split())[:300])
  except config_check.ConfigError as e:
    fail(str(e))
  if _MODE.value != "prepare":  # prepare writes the records once, from a single process
    from satsynth_jax import distributed  # imports jax: kept off prepare's path
    try:
      distributed.initialize(distributed.resolve(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                                 _PROCESS_ID.value))
    except distributed.DistributedConfigError as e:
      fail(str(e))
  module_name, fn_name = MODES[_MODE.value].split(":")
  job = getattr(importlib.import_module(module_name), fn_name)
  logging.info("mode=%s workdir=%s", _MODE.value, _WORKDIR.value)
  try:
    job(config, _WORKDIR.value)
  except SatSynthError as e:  # bad data, missing checkpoint, diverged run: say what to fix
    fail(" ".join(str(e).split()))


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
