"""Command line: `python -m satsynth_jax.main --config=configs/X.py --workdir=DIR --mode=MODE`.

Every job reads its inputs from and writes its outputs under --workdir (DESIGN.md).
Config overrides use ml_collections syntax: `--config.data.patch_size=128`. A `configs/X.py` that is not
a file in the current folder is the installed one (satsynth_jax.configs), so commands run from any folder.
Several hosts: every job but `prepare` joins a jax.distributed run first (satsynth_jax/distributed.py).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import pathlib
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from satsynth_jax import atomic, config_check, host_devices, lock, workdir as layout
from satsynth_jax.errors import SatSynthError

# mode -> "module:function(config, workdir)"; imported lazily so `prepare` stays light.
MODES = {
    "prepare": "satsynth_jax.data.prepare:run",
    "train_diffusion": "satsynth_jax.train.diffusion:run",
    "train_sr": "satsynth_jax.train.super_resolution:run",
    "sample": "satsynth_jax.sample:run",
    "curate": "satsynth_jax.curate:run",
    "train_metric_encoder": "satsynth_jax.train.metric_encoder:run",
    "evaluate_samples": "satsynth_jax.sample_quality:run",
    "train_segmentation": "satsynth_jax.train.segmentation:run",
    "evaluate": "satsynth_jax.evaluate:run",
    "experiment": "satsynth_jax.experiment:run",
    "export": "satsynth_jax.export:run",
}
SINGLE_PROCESS = ("prepare", "export")  # jobs that write their outputs once, from one process
# The job kinds whose workdir locks (lock.py) a mode holds: its own; the experiment runs them all.
LOCKED_KINDS = {mode: (mode,) for mode in MODES} | {"experiment": tuple(MODES)}

CONFIGS_PACKAGE = "satsynth_jax.configs"  # setup.py installs the top-level configs/ folder under this name


def _configs_dir() -> pathlib.Path | None:
  """The folder of the installed configs. A checkout's own satsynth_jax (python -m from the repository
  root) shadows a non-editable install and lacks them: its configs/ is then registered in their place,
  so the config files' `from satsynth_jax.configs import default` works there too."""
  spec = importlib.util.find_spec(CONFIGS_PACKAGE)
  if spec is not None:
    return pathlib.Path(spec.submodule_search_locations[0])
  folder = pathlib.Path(__file__).resolve().parent.parent / "configs"
  if not (folder / "__init__.py").is_file():
    return None
  spec = importlib.util.spec_from_file_location(CONFIGS_PACKAGE, folder / "__init__.py",
                                                submodule_search_locations=[str(folder)])
  sys.modules[CONFIGS_PACKAGE] = module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return folder


def resolve_config_path(path: str) -> str:
  """`configs/NAME.py` (or `NAME.py`) that is not a file here means the installed configs' NAME.py,
  so the README's commands run from any folder; other paths are used as given."""
  configs = _configs_dir()
  if not path:
    raise ValueError("the config path is empty, e.g. --config=configs/demo.py")
  if os.path.exists(path):
    return path
  looked = [os.path.abspath(path)]
  parts = pathlib.PurePath(path).parts
  if configs is not None and not os.path.isabs(path) and parts[:-1] in ((), ("configs",)):
    installed = configs / parts[-1]
    if installed.is_file():
      return str(installed)
    looked.append(str(installed))
  raise ValueError(f"no config file {path}: looked for {' and '.join(looked)}")


class _ConfigPathParser(flags.ArgumentParser):
  """Wraps ml_collections' config file parser (`PATH[:ARG]`, ARG going to get_config): resolves PATH first."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    path, sep, arg = argument.partition(":")  # the same first-colon split as ml_collections
    return self._parser.parse(resolve_config_path(path) + sep + arg)

  def flag_type(self):
    return self._parser.flag_type()


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file and optional preset, e.g. configs/loveda.py or configs/loveda.py:cpu; "
    "configs/NAME.py that is not a file in the current folder means the installed config NAME.py.",
    lock_config=True)
# The flag keeps ml_collections' overrides (--config.a.b=...); only how its path is found changes.
flags.FLAGS[_CONFIG.name].parser = _ConfigPathParser(flags.FLAGS[_CONFIG.name].parser)
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
  except flags.Error as e:  # absl: unparsable value, unknown flag, a config file's get_config failing
    text = str(e)
    if "Traceback" in text:  # the config file raised: keep the flag and its own last line, not the stack
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      text = f"{lines[0].rstrip(':')}: {lines[-1]}"
    fail(f"bad command line: {' '.join(text.split())}")


_OS_REMEDIES = {errno.ENOSPC: "free disk space or use another --workdir",
                errno.EDQUOT: "free disk space or use another --workdir",
                errno.EROFS: "the filesystem is read-only: use another --workdir",
                errno.EACCES: "make it accessible or use another --workdir",
                errno.EPERM: "make it accessible or use another --workdir"}


def _os_error_message(e: OSError) -> str:
  """`path: reason (during operation in module.function)[; remedy]` for a filesystem error inside a job."""
  frames = traceback.extract_tb(e.__traceback__)
  ours = [f for f in frames if f"{os.sep}satsynth_jax{os.sep}" in f.filename]
  where = f"{os.path.splitext(os.path.basename(ours[-1].filename))[0]}.{ours[-1].name}" if ours else None
  if ours and ours[-1] is frames[-1]:
    operation = where
  else:
    operation = (frames[-1].name if frames else "?") + (f" in {where}" if where else "")
  path = " -> ".join(os.fspath(p) for p in (e.filename, e.filename2) if p is not None) or "(no path given)"
  remedy = _OS_REMEDIES.get(e.errno)
  return f"{path}: {e.strerror or e} (during {operation})" + (f"; {remedy}" if remedy else "")


@contextlib.contextmanager
def _job_lock(workdir, mode: str, primary: bool, processes: int):
  """Process 0 holds the workdir locks of `mode` for the job and clears temp files of dead writers;
  the other processes of a multi-process job (the same job) learn whether it got them."""
  with contextlib.ExitStack() as stack:
    refused = None
    if primary:
      try:
        stack.enter_context(lock.hold(workdir, LOCKED_KINDS[mode], mode))
      except lock.LockHeldError as e:
        refused = str(e)
      except OSError as e:  # e.g. a read-only workdir: told to the other processes too, not left hanging
        refused = _os_error_message(e)
    if processes > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415  (multi-process jobs only)
      import numpy as np  # noqa: PLC0415
      got = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
      if not primary and not got:
        fail(f"process 0 could not take the job lock under {layout.resolve(workdir) / 'locks'}; see its error")
    if refused is not None:
      fail(refused)
    if primary:  # under the lock, so no job of this kind is writing; live writers' temp files stay
      try:
        for path in atomic.remove_orphans(workdir):
          logging.info("removed %s, left by a writer that is no longer running", path)
      except OSError as e:  # leftovers cost disk space only: not a reason to stop the job
        logging.warning("could not clear temp files under %s: %s", workdir, e)
    yield


def _persistent_compilation_cache() -> None:
  """Keep compiled XLA programs across jobs and reruns (the experiment's stages and seeds compile
  the same steps); JAX_COMPILATION_CACHE_DIR, when set, chooses the folder."""
  import jax  # noqa: PLC0415  (kept off prepare's path)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.expanduser("~"), ".cache", "satsynth_jax", "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
    workdir = layout.resolve(_WORKDIR.value)
    config = _CONFIG.value
    config_check.validate(config, mode=_MODE.value)
  except OSError as e:  # config_flags defers a missing or broken config file to first use
    fail(" ".join(str(e).split())[:300])
  except SatSynthError as e:
    fail(str(e))
  primary, processes = True, 1
  if _MODE.value not in SINGLE_PROCESS:
    cpu_devices = host_devices.configure(config)  # before JAX starts its backends
    _persistent_compilation_cache()
    from satsynth_jax import distributed  # imports jax: kept off prepare's path
    try:
      distributed.initialize(distributed.resolve(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                                 _PROCESS_ID.value))
    except distributed.DistributedConfigError as e:
      fail(str(e))
    import jax  # noqa: PLC0415  (after jax.distributed.initialize: the device count spans every host)
    try:
      config_check.validate_devices(config, jax.device_count())
    except config_check.ConfigError as e:
      fail(str(e))
    primary, processes = jax.process_index() == 0, jax.process_count()
    if processes > 1 and jax.default_backend() == "cpu":
      # JAX writes the persistent cache from process 0 only, and the other processes' keys differ:
      # with a warm cache process 0 would start stepping while the rest still compile, and the
      # first collective outlasts gloo's fixed 30 s wait. Compiling on every process keeps them level.
      jax.config.update("jax_enable_compilation_cache", False)
      logging.info("persistent compilation cache off: a multi-process CPU run compiles on every process")
    if cpu_devices and jax.default_backend() == "cpu":
      logging.info("data-parallel over %d CPU devices (one per core that every batch divides); XLA_FLAGS=%s",
                   cpu_devices, os.environ.get("XLA_FLAGS", ""))
  if _ALLOW_FALLBACK.value:
    from satsynth_jax import checkpoint  # noqa: PLC0415  (imports orbax: kept off prepare's path)
    checkpoint.configure(allow_fallback=True)
  module_name, fn_name = MODES[_MODE.value].split(":")
  job = getattr(importlib.import_module(module_name), fn_name)
  logging.info("mode=%s workdir=%s", _MODE.value, workdir)
  try:
    with _job_lock(workdir, _MODE.value, primary, processes):
      job(config, workdir)
  except SatSynthError as e:  # bad data, missing checkpoint, diverged run: say what to fix
    fail(" ".join(str(e).split()))
  except OSError as e:  # read-only or full disk, a path under a file: name the path and the operation
    fail(_os_error_message(e))


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
