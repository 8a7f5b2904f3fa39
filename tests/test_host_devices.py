"""The CLI's XLA:CPU flags: convolutions off YNNPACK where jaxlib knows the flag, one CPU device
unless XLA_FLAGS asks for more, and settings already made left alone."""

import os
import subprocess
import sys

from satsynth_jax.infra import host_devices
from tests.conftest import REPO

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def test_configure_appends_the_conv_flag_and_respects_settings_already_made(monkeypatch):
  monkeypatch.setattr(host_devices, "jaxlib_version", lambda: (0, 10))
  environ = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  host_devices.configure(environ)
  assert environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {host_devices.CONV_FLAG}"
  preset = {"XLA_FLAGS": f"{DEVICE_COUNT_FLAG}=3 --xla_cpu_experimental_ynn_fusion_type="}
  host_devices.configure(preset)
  assert preset["XLA_FLAGS"] == f"{DEVICE_COUNT_FLAG}=3 --xla_cpu_experimental_ynn_fusion_type="
  gpu = {"JAX_PLATFORMS": "cuda"}
  host_devices.configure(gpu)
  assert "XLA_FLAGS" not in gpu


def test_a_jaxlib_without_the_ynnpack_flag_does_not_get_it(monkeypatch):
  """XLA aborts on a flag it does not know (jaxlib 0.8 has no YNNPACK settings)."""
  monkeypatch.setattr(host_devices, "jaxlib_version", lambda: (0, 8))
  environ = {}
  host_devices.configure(environ)
  assert "XLA_FLAGS" not in environ


def test_the_installed_jaxlib_accepts_the_flags_it_is_given():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  host_devices.configure(env)
  code = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: (x * 2).sum())(jnp.ones(4)), jax.device_count())"
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.split() == ["8.0", "1"], (env["XLA_FLAGS"], result.stderr[-1500:])


def _cli_device_line(tmp_path, env) -> str:
  # The cheapest job that starts JAX: sampling from a workdir with no generator fails after it.
  result = subprocess.run([sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py",
                           "--mode=sample", f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if "device(s) on this process" in line]
  assert lines, result.stderr[-2000:]
  return lines[0]


def test_cli_runs_on_one_cpu_device_unless_xla_flags_ask_for_more(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  assert "] 1 cpu device(s)" in _cli_device_line(tmp_path / "one", env)
  env["XLA_FLAGS"] = f"{DEVICE_COUNT_FLAG}=2"
  line = _cli_device_line(tmp_path / "two", env)
  assert "] 2 cpu device(s)" in line and host_devices.CONV_FLAG in line
