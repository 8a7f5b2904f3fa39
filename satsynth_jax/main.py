"""Command line: `python -m satsynth_jax.main --config=configs/X.py --workdir=DIR --mode=MODE`.

Every job reads its inputs from and writes its outputs under --workdir (DESIGN.md); each mode is
one module of satsynth_jax/jobs/. Config overrides use ml_collections syntax:
`--config.data.patch_size=128`. A `configs/X.py` that is not a file in the current folder is the
installed one (satsynth_jax.configs), so commands run from any folder. Several hosts: every job
but `prepare` and `export` joins a jax.distributed run first (infra/distributed.py).
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

from satsynth_jax import config_check
from satsynth_jax.infra import cli, workdir as layout
from satsynth_jax.infra.errors import SatSynthError

# mode -> "module:function(config, workdir)"; imported lazily so `prepare` stays light.
MODES = {
    "prepare": "satsynth_jax.jobs.prepare:run",
    "train_diffusion": "satsynth_jax.jobs.train_diffusion:run",
    "train_sr": "satsynth_jax.jobs.train_sr:run",
    "sample": "satsynth_jax.jobs.sample:run",
    "curate": "satsynth_jax.jobs.curate:run",
    "train_metric_encoder": "satsynth_jax.jobs.train_metric_encoder:run",
    "evaluate_samples": "satsynth_jax.jobs.sample_quality:run",
    "train_segmentation": "satsynth_jax.jobs.train_segmentation:run",
    "evaluate": "satsynth_jax.jobs.evaluate:run",
    "experiment": "satsynth_jax.jobs.experiment:run",
    "export": "satsynth_jax.jobs.export:run",
}
SINGLE_PROCESS = ("prepare", "export")  # jobs that write their outputs once, from one process
# The job kinds whose workdir locks (infra/lock.py) a mode holds: its own; the experiment runs them all.
LOCKED_KINDS = {mode: (mode,) for mode in MODES} | {"experiment": tuple(MODES)}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file and optional preset, e.g. configs/loveda.py or configs/loveda.py:cpu; "
    "configs/NAME.py that is not a file in the current folder means the installed config NAME.py.",
    lock_config=True)
# The flag keeps ml_collections' overrides (--config.a.b=...); only how its path is found changes.
flags.FLAGS[_CONFIG.name].parser = cli.ConfigPathParser(flags.FLAGS[_CONFIG.name].parser)
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
_ALLOW_FALLBACK = flags.DEFINE_boolean(
    "allow_checkpoint_fallback", False,
    "When the latest checkpoint of a run is unreadable or damaged, use the newest earlier step that verifies "
    "(logging which step was skipped and why) instead of stopping.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; all settings are flags")
  if _CONFIG.value is None:
    cli.fail("--config is required, e.g. --config=configs/demo.py")
  if _MODE.value not in MODES:
    cli.fail(f"unknown --mode={_MODE.value!r}; available modes: {', '.join(MODES)}")
  if not _WORKDIR.value:
    cli.fail("--workdir is required: every output of the run goes under it")
  try:
    workdir = layout.resolve(_WORKDIR.value)
    config = _CONFIG.value
    config_check.validate(config, mode=_MODE.value)
  except OSError as e:  # config_flags defers a missing or broken config file to first use
    cli.fail(" ".join(str(e).split())[:300])
  except SatSynthError as e:
    cli.fail(str(e))
  primary, processes = True, 1
  if _MODE.value not in SINGLE_PROCESS:
    cli.start_jax(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax  # noqa: PLC0415  (after jax.distributed.initialize: the device count spans every host)
    try:
      config_check.validate_devices(config, jax.device_count())
    except SatSynthError as e:
      cli.fail(str(e))
    logging.info("%d %s device(s) on this process; XLA_FLAGS=%s", jax.local_device_count(), jax.default_backend(),
                 os.environ.get("XLA_FLAGS", ""))
    primary, processes = jax.process_index() == 0, jax.process_count()
  if _ALLOW_FALLBACK.value:
    from satsynth_jax.infra import checkpoint  # noqa: PLC0415  (imports orbax: kept off prepare's path)
    checkpoint.configure(allow_fallback=True)
  module_name, fn_name = MODES[_MODE.value].split(":")
  job = getattr(importlib.import_module(module_name), fn_name)
  logging.info("mode=%s workdir=%s", _MODE.value, workdir)
  with cli.one_line_errors(), cli.job_lock(workdir, LOCKED_KINDS[_MODE.value], _MODE.value, primary, processes):
    job(config, workdir)


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
