"""What the command line needs beside its flags (main.py): config paths, one-line errors, the job lock, JAX's start.

Every user mistake ends as one stderr line `satsynth_jax: error: ...` and exit code 2 (`fail`);
an absl flag error, a config file that raises, a filesystem error inside a job and a held lock
are all turned into that line here.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import pathlib
import re
import sys
import traceback

from absl import flags, logging

from satsynth_jax.infra import atomic, host_devices, lock, workdir as layout
from satsynth_jax.infra.errors import SatSynthError

CONFIGS_PACKAGE = "satsynth_jax.configs"  # setup.py installs the top-level configs/ folder under this name


def fail(message: str) -> None:
  """One line on stderr and a non-zero exit: what went wrong and what to change."""
  print(f"satsynth_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


# ---- --config=PATH[:ARG] from any folder ----

def _configs_dir() -> pathlib.Path | None:
  """The folder of the installed configs. A checkout's own satsynth_jax (python -m from the repository
  root) shadows a non-editable install and lacks them: its configs/ is then registered in their place,
  so the config files' `from satsynth_jax.configs import default` works there too."""
  spec = importlib.util.find_spec(CONFIGS_PACKAGE)
  if spec is not None:
    return pathlib.Path(spec.submodule_search_locations[0])
  folder = pathlib.Path(__file__).resolve().parents[2] / "configs"
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


class ConfigPathParser(flags.ArgumentParser):
  """Wraps ml_collections' config file parser (`PATH[:ARG]`, ARG going to get_config): resolves PATH first."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    path, sep, arg = argument.partition(":")  # the same first-colon split as ml_collections
    return self._parser.parse(resolve_config_path(path) + sep + arg)

  def flag_type(self):
    return self._parser.flag_type()


# ---- one-line errors ----

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


def parse_flags(argv):
  """absl's flag parsing (app.run's flags_parser), every failure as one line."""
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


def os_error_message(e: OSError) -> str:
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
def one_line_errors():
  """A job's errors a user can fix, as one line: what to change (SatSynthError), or the path and
  operation of a filesystem error (read-only or full disk, a path under a file)."""
  try:
    yield
  except SatSynthError as e:  # bad data, missing checkpoint, diverged run
    fail(" ".join(str(e).split()))
  except OSError as e:
    fail(os_error_message(e))


# ---- the job's lock and JAX's start ----

@contextlib.contextmanager
def job_lock(workdir, kinds, mode: str, primary: bool, processes: int):
  """Process 0 holds the workdir locks of the job kinds `kinds` for job `mode` and clears temp files of
  dead writers; the other processes of a multi-process job (the same job) learn whether it got them."""
  with contextlib.ExitStack() as stack:
    refused = None
    if primary:
      try:
        stack.enter_context(lock.hold(workdir, kinds, mode))
      except lock.LockHeldError as e:
        refused = str(e)
      except OSError as e:  # e.g. a read-only workdir: told to the other processes too, not left hanging
        refused = os_error_message(e)
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


def start_jax(distributed_mode: str, coordinator: str | None, num_processes: int | None,
              process_id: int | None) -> None:
  """XLA's CPU flags, the persistent compile cache, and the jax.distributed run (--distributed and its
  flags), before JAX starts its backends."""
  host_devices.configure()
  _persistent_compilation_cache()
  from satsynth_jax.infra import distributed  # noqa: PLC0415  (imports jax: kept off prepare's path)
  try:
    distributed.initialize(distributed.resolve(distributed_mode, coordinator, num_processes, process_id))
  except distributed.DistributedConfigError as e:
    fail(str(e))
  import jax  # noqa: PLC0415  (after jax.distributed.initialize: the device count spans every host)
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    # JAX writes the persistent cache from process 0 only, and the other processes' keys differ:
    # with a warm cache process 0 would start stepping while the rest still compile, and the
    # first collective outlasts gloo's fixed 30 s wait. Compiling on every process keeps them level.
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("persistent compilation cache off: a multi-process CPU run compiles on every process")
