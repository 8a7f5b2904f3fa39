"""pytest plugin for mutation runs (tools/mutation/mutation.sh loads it with `-p tools.mutation.mutation_plugin`).

mutmut 3 swaps in a mutant through a trampoline that reads MUTANT_UNDER_TEST when the function
is *called*; under jax.jit that happens once, while tracing. Hence:
  - stats run: clear JAX's trace caches before every test, so each test that calls a function
    (even through an already-traced jit) is recorded as covering it; otherwise mutants in traced
    code would skip the tests that could kill them.
  - mutant runs: each mutant is a fresh forked process (the fork server never started the JAX
    backend), so nothing traced under another mutant is reused.
It also runs each mutant's tests fastest first (mutmut stops at the first failure) and turns
off hypothesis's shrinking, which only costs time once a mutant is killed.
"""

from __future__ import annotations

import gc
import json
import os

import pytest

try:
  from hypothesis import HealthCheck, Phase, settings
except ImportError:  # hypothesis is a test extra; the plugin works without it
  settings = None
else:
  # Derandomised: the same examples for every mutant, so verdicts repeat run to run.
  settings.register_profile("mutation", derandomize=True, database=None, deadline=None,
                            phases=[Phase.explicit, Phase.generate],
                            suppress_health_check=list(HealthCheck))
  settings.load_profile("mutation")


def _mutant() -> str:
  return os.environ.get("MUTANT_UNDER_TEST", "")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
  # Everything imported so far (JAX, the preloaded modules) lives as long as the process: keep it
  # out of the garbage collector's scans, which otherwise cost ~0.4 s per full collection.
  gc.freeze()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  if _mutant() == "stats":
    import jax
    jax.clear_caches()


def pytest_collection_modifyitems(session, config, items):
  if _mutant() in ("", "stats", "fail", "mutant_generation"):
    return
  try:
    with open("mutmut-stats.json", encoding="utf-8") as f:  # cwd is mutants/
      durations = json.load(f)["duration_by_test"]
  except (OSError, ValueError, KeyError):
    return
  items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
