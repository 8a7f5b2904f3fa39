"""Test-wide setup: 4 forced CPU devices (sharding tests) and the shared real-data folder."""

import os
import pathlib
import subprocess
import sys

# Must precede the first jax import in the session.
# The suite compiles far more than it runs: LLVM at -O1 compiles the demo's train steps 16-26%
# faster than XLA's default -O2 (benchmarks/compile_time.py, RESULTS.md). Every test process and
# CLI subprocess gets it; the CLI itself keeps XLA's default.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
from satsynth_jax.infra import host_devices  # noqa: E402  (imports no jax)
host_devices.configure(os.environ)  # the convolutions the CLI runs (infra/host_devices.py)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and their CLI subprocesses) compile the same small models: share the work.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/satsynth_jax_test_xla_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# Two BLAS threads on two busy cores make eigh (FID) several times slower, not faster.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The smallest G the code allows (one resolution level, no attention) on 8 px pairs cut from two
# 64 px demo scenes: the tests of training, sampling, resume and multi-process flows share it
# (most of their time is compiling; test_unet.py covers the full layouts), and identical
# programs are compiled once through the compile cache.
TINY_G = {
    "diffusion.model.ch": 32, "diffusion.model.ch_mult": (1,), "diffusion.model.num_res_blocks": 1,
    "diffusion.model.attn_resolutions": (), "diffusion.timesteps": 50, "data.image_size": 8,
    "data.patch_size": 32, "data.demo_num_scenes": 2, "data.demo_scene_size": 64, "data.read_threads": 1,
    "diffusion.train.batch_size": 8,
}
# That G trained for 4 steps (checkpoints at 2 and 4) and sampled by DDIM in 2 steps: the training,
# resume, sampling and failure flows.
TINY_G_RUN = {
    **TINY_G, "diffusion.train.num_steps": 4, "diffusion.train.warmup_steps": 2, "diffusion.train.log_every": 2,
    "diffusion.train.checkpoint_every": 2, "diffusion.train.sample_every": 0, "sample.per_real": 1,
    "sample.ddim_steps": 2, "sample.batch_size": 8, "sample.examples_per_shard": 4,
}
# One 32 px demo scene per split cut into 16 px patches (4 train, 8 val, 16 test) and the smallest
# segmenter: the U-Net head on a ResNet of one block per stage.
TINY_SEGMENTER = {
    "data.demo_num_scenes": 1, "data.demo_scene_size": 32, "data.patch_size": 16, "data.image_size": 16,
    "segmentation.architecture": "unet", "segmentation.backbone_stages": (1, 1, 1, 1),
}
# That segmenter trained for 30 steps (checkpoints at 15 and 30) at ResNet-50's widths, the ones
# torchvision weights fit. Its head classifies at full resolution, so it fits the 4 train patches in
# few steps (the FPN's logits are at stride 4); with a constant schedule every run, whatever its
# num_steps, compiles the same train step.
TINY_SEGMENTER_RUN = {
    **TINY_SEGMENTER, "data.augment": False, "data.read_threads": 2, "segmentation.base_width": 64,
    "segmentation.train.batch_size": 4, "segmentation.train.num_steps": 30, "segmentation.train.lr": 3e-3,
    "segmentation.train.schedule": "constant", "segmentation.train.warmup_steps": 0,
    "segmentation.train.log_every": 10, "segmentation.train.checkpoint_every": 15,
    "segmentation.eval_batch_size": 4,
}
# The smallest whole experiment, G, its set and the segmenter arms at 16 px; each test sets the data,
# the run lengths and which stages run.
TINY_EXPERIMENT = {
    "data.image_size": 16, "diffusion.model.ch_mult": (1,), "diffusion.model.attn_resolutions": (),
    "diffusion.timesteps": 50, "diffusion.train.batch_size": 8, "diffusion.train.warmup_steps": 1,
    "diffusion.train.sample_every": 0, "sample.per_real": 1, "sample.batch_size": 8, "sample.examples_per_shard": 8,
    "segmentation.architecture": "unet", "segmentation.train.batch_size": 4, "segmentation.train.warmup_steps": 1,
    "segmentation.eval_batch_size": 8,
}


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (real LoveDA/iSAID pairs; licences forbid copying them into the repo)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (licence forbids bundling it)")
  return SHARED_DATA


# The paper's method at the `cpu` preset's budgets: an unconditional G with an unweighted loss and the
# raw and curated arms. Most tests exercise the pipeline's mechanics and were written for it (set and
# run names, stage lists), and its tiny G compiles and samples faster; load_config and every CLI
# launch below start from it. The demo's conditioned, class-weighted G has its own tests
# (test_conditioning.py, test_class_weights.py, test_experiment.py's shipped-demo run).
PAPER_METHOD = {"diffusion.condition": "none", "diffusion.class_weight_power": 0.0, "sample.guidance": 0.0,
                "experiment.arms": ("raw", "curated")}


def paper_method_flags(overrides=()) -> list[str]:
  """PAPER_METHOD as command-line overrides, for a test's own `python -m satsynth_jax.main` line
  (less the keys the test's `overrides` set themselves)."""
  return [config_flag(key, value) for key, value in PAPER_METHOD.items() if key not in overrides]


def load_config(name: str, *, shipped: bool = False, **overrides):
  """configs/<name>.py from PAPER_METHOD (as shipped with shipped=True) with dotted overrides, e.g.
  load_config("demo", **{"data.patch_size": 32})."""
  import importlib
  import sys

  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in (({} if shipped else PAPER_METHOD) | overrides).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def prepared_demo(tmp_path_factory, name: str, overrides: dict):
  """(the demo config with `overrides`, a fresh workdir `name` holding its prepared splits)."""
  from satsynth_jax.jobs import prepare  # noqa: PLC0415  (after the environment above is set)

  workdir = str(tmp_path_factory.mktemp(name))
  config = load_config("demo", **overrides)
  prepare.run(config, workdir)
  return config, workdir


def config_flag(key: str, value) -> str:
  """A command-line override: config_flag("diffusion.model.ch_mult", (1, 2)) -> "--config.diffusion.model.ch_mult=(1,2)"."""
  if isinstance(value, tuple):  # ml_collections parses the flag as a Python literal
    value = f"({','.join(map(repr, value))}{',' if len(value) == 1 else ''})"
  return f"--config.{key}={value}"


def cpu_env(devices: int, **more) -> dict:
  """This environment with `devices` forced CPU devices and the suite's XLA flags, for a subprocess
  (the CLI adds its own CPU flags, infra/host_devices.py)."""
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}", **more}


def run_main(mode: str, workdir, overrides: dict, config: str = "demo", timeout: int = 900,
             shipped: bool = False) -> str:
  """`python -m satsynth_jax.main` as a user runs it, on one CPU device; asserts success, returns stdout.

  One device: 4 virtual ones on 2 shared cores only add all-reduce copies. The compile cache
  set above is shared with these subprocesses.
  """
  cmd = [sys.executable, "-m", "satsynth_jax.main", f"--config=configs/{config}.py", f"--mode={mode}",
         f"--workdir={workdir}", *(() if shipped else paper_method_flags(overrides)),
         *(config_flag(k, v) for k, v in overrides.items())]
  env = cpu_env(devices=1)
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="module")
def segmenter_cli():
  """segmenter_cli(mode, workdir, overrides=None) runs the CLI (run_main) on TINY_SEGMENTER_RUN + overrides;
  returns stdout."""
  return lambda mode, workdir, overrides=None: run_main(mode, workdir, {**TINY_SEGMENTER_RUN, **(overrides or {})})
