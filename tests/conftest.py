"""Test-wide setup: 4 forced CPU devices (sharding tests) and the shared real-data folder."""

import os
import pathlib

# Must precede the first jax import in the session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and their CLI subprocesses) compile the same small models: share the work.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/satsynth_jax_test_xla_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# Two BLAS threads on two busy cores make eigh (FID) several times slower, not faster.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (real LoveDA/iSAID pairs; licences forbid copying them into the repo)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (licence forbids bundling it)")
  return SHARED_DATA


def load_config(name: str, **overrides):
  """configs/<name>.py with dotted overrides, e.g. load_config("demo", **{"data.patch_size": 32})."""
  import importlib
  import sys

  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
