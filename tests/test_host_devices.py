"""The CLI splits a CPU host into XLA devices that every batch divides, and leaves set flags alone."""

import os
import subprocess
import sys

import pytest

from satsynth_jax.infra import host_devices
from tests.conftest import REPO, load_config


@pytest.mark.parametrize("cores, batches, expected", [
    (2, (32, 16, 128, 32, 32), 2),
    (1, (32, 16, 128, 32, 32), 1),
    (3, (32, 16, 128, 32, 32), 2),  # a power of two below the core count
    (16, (64, 64, 64, 16, 16), 8),  # capped at MAX_DEVICES
    (16, (64, 64, 64, 16, 12), 4),  # 12 splits over 4 devices, not 8
    (4, (64, 64, 64, 16, 3), 1),  # an odd batch keeps one device
])
def test_device_count_is_the_largest_power_of_two_every_batch_divides(cores, batches, expected):
  assert host_devices.choose(cores, batches) == expected


def test_configure_appends_the_flags_and_respects_settings_already_made(monkeypatch):
  config = load_config("demo")
  monkeypatch.setattr(host_devices, "jaxlib_version", lambda: (0, 10))
  environ = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  count = host_devices.configure(config, environ)
  assert count == host_devices.choose(len(os.sched_getaffinity(0)), host_devices.batch_sizes(config))
  assert environ["XLA_FLAGS"] == (f"--xla_cpu_enable_fast_math=false {host_devices.CONV_FLAG} "
                                  f"{host_devices.FLAG}={count}")
  preset = {"XLA_FLAGS": f"{host_devices.FLAG}=3 --xla_cpu_experimental_ynn_fusion_type="}
  assert host_devices.configure(config, preset) is None
  assert preset["XLA_FLAGS"] == f"{host_devices.FLAG}=3 --xla_cpu_experimental_ynn_fusion_type="
  gpu = {"JAX_PLATFORMS": "cuda"}
  assert host_devices.configure(config, gpu) is None and "XLA_FLAGS" not in gpu


def test_a_jaxlib_without_the_ynnpack_flag_does_not_get_it(monkeypatch):
  """XLA aborts on a flag it does not know (jaxlib 0.8 has no YNNPACK settings)."""
  monkeypatch.setattr(host_devices, "jaxlib_version", lambda: (0, 8))
  environ = {}
  count = host_devices.configure(load_config("demo"), environ)
  assert environ["XLA_FLAGS"] == f"{host_devices.FLAG}={count}"


def test_the_installed_jaxlib_accepts_the_flags_it_is_given():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  host_devices.configure(load_config("demo"), env)
  code = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: (x * 2).sum())(jnp.ones(4)))"
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "8.0", (env["XLA_FLAGS"], result.stderr[-1500:])


def test_cli_runs_on_the_chosen_number_of_cpu_devices(tmp_path):
  """Without a device count in XLA_FLAGS the CLI picks one before JAX starts (the log names it)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  config = load_config("demo")
  expected = host_devices.choose(len(os.sched_getaffinity(0)), host_devices.batch_sizes(config))
  # A config error raised after the device check proves the devices were counted; the cheapest
  # job that reaches it is sampling from a workdir with no generator.
  result = subprocess.run([sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py",
                           "--mode=sample", f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0
  assert f"{expected} CPU device" in result.stderr, result.stderr[-2000:]
