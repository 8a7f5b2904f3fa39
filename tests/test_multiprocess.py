"""Two processes on localhost (2 CPU devices each, gloo collectives) behave like one with 4 devices.

The pair trains G for a few steps through the real CLI (jax.distributed over a loopback
coordinator), then samples; the test compares with a single-process run of the same loop
fed the same global batches, and checks the synthetic shards both processes wrote.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

import mp_launch
from conftest import REPO, TINY_G_RUN, load_config, paper_method_flags
from satsynth_jax import resolved
from satsynth_jax.data import pipeline, records
from satsynth_jax.infra import checkpoint, distributed, parallel, workdir as layout
from satsynth_jax.jobs import prepare
from satsynth_jax.train import diffusion, loop

NUM_PROCESSES = mp_launch.NUM_PROCESSES
TINY = {**TINY_G_RUN, "diffusion.train.sample_every": 4, "diffusion.train.num_grid_samples": 4,
        "diffusion.train.grid_sampler_steps": 2, "sample.per_real": 2}


def _launch(workdir: str, mode: str, logs: pathlib.Path, via_env: bool) -> list[str]:
  """Runs `mode` on NUM_PROCESSES local processes (mp_launch: port clashes retried); returns their logs."""
  return mp_launch.launch_ok(workdir, mode, TINY, logs, via_env=via_env)


def _global_batches(config, real_dir: str, num_steps: int) -> list[dict]:
  """Step i's global batch as the processes assemble it: process 0's rows, then process 1's."""
  per_process = config.diffusion.train.batch_size // NUM_PROCESSES
  streams = [iter(pipeline.diffusion_batches(config, real_dir, batch_size=per_process, seed=config.seed,
                                             process_index=p, process_count=NUM_PROCESSES))
             for p in range(NUM_PROCESSES)]
  return [{"x": np.concatenate([next(s)["x"] for s in streams])} for _ in range(num_steps)]


def _final_state(config, workdir: str):
  mesh = parallel.make_mesh()
  task = diffusion.make_task(config, workdir, mesh)
  mngr = checkpoint.manager(layout.checkpoint_dir(workdir, task.name), create=False)
  state, _ = checkpoint.restore(mngr, loop.abstract_state(task, mesh, config.seed))
  assert int(state.step) == config.diffusion.train.num_steps
  return parallel.to_host({"params": state.params, "ema_params": state.ema_params, "opt_state": state.opt_state})


def _metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics", "diffusion_x0.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


ENV = {"SATSYNTH_COORDINATOR": "10.0.0.1:1234", "SATSYNTH_NUM_PROCESSES": "4", "SATSYNTH_PROCESS_ID": "3"}


def test_settings_come_from_flags_then_environment():
  assert distributed.resolve("auto", environ=ENV) == distributed.Settings("10.0.0.1:1234", 4, 3)
  assert distributed.resolve("auto", "h:1", 2, 0, environ=ENV) == distributed.Settings("h:1", 2, 0)
  assert distributed.resolve("off", environ=ENV) is None


def test_auto_stays_single_process_unless_settings_or_a_multi_host_tpu_say_otherwise():
  assert distributed.resolve("auto", environ={}) is None
  assert distributed.resolve("auto", "h:1", 1, 0, environ={}) is None
  assert distributed.resolve("auto", environ={"TPU_WORKER_HOSTNAMES": "t1k-w-0"}) is None
  # A pod slice, or "on": JAX's cluster detection supplies the settings.
  assert distributed.resolve("auto", environ={"TPU_WORKER_HOSTNAMES": "w-0,w-1"}) == distributed.Settings()
  assert distributed.resolve("on", environ={}) == distributed.Settings()


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator_address": "h:1"}, "--num_processes (or SATSYNTH_NUM_PROCESSES) and --process_id"),
    ({"num_processes": 2, "process_id": 0}, "--coordinator_address (or SATSYNTH_COORDINATOR) must be set"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     "--process_id (or SATSYNTH_PROCESS_ID) must be in [0, 2), got 2"),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "must be host:port, got 'h'"),
    ({"coordinator_address": "h:1", "num_processes": "two", "process_id": 0}, "must be an integer, got 'two'"),
    ({"mode": "yes"}, "--distributed='yes': must be one of auto, on, off"),
])
def test_incomplete_or_bad_settings_name_the_setting(kwargs, message):
  with pytest.raises(distributed.DistributedConfigError, match=re.escape(message)):
    distributed.resolve(**{"mode": "auto", **kwargs}, environ={})


def test_cli_refuses_incomplete_settings_before_starting(tmp_path):
  result = subprocess.run([sys.executable, "-m", "satsynth_jax.main", "--config=configs/demo.py",
                           *paper_method_flags(), f"--workdir={tmp_path}", "--mode=sample", "--coordinator_address=127.0.0.1:1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SATSYNTH_")})
  assert result.returncode == 2
  assert "--num_processes (or SATSYNTH_NUM_PROCESSES) and --process_id" in result.stderr


# Three fixtures, not one: a failed sampling launch or reference run errors only the tests that need it.
@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """(config, workdir, logs folder) after train_diffusion on the pair."""
  config = load_config("demo", **TINY)
  multi = str(tmp_path_factory.mktemp("two_processes"))
  logs = tmp_path_factory.mktemp("logs")
  prepare.run(config, multi)
  _launch(multi, "train_diffusion", logs, via_env=False)
  return config, multi, logs


@pytest.fixture(scope="module")
def one_process(two_processes, tmp_path_factory):
  """A single-process run of the same loop (4 devices) fed the pair's global batches: its workdir."""
  config, multi, _ = two_processes
  single = str(tmp_path_factory.mktemp("one_process"))
  shutil.copytree(os.path.join(multi, "data"), os.path.join(single, "data"))  # G's identity names its data
  mesh = parallel.make_mesh()
  assert mesh.size == 2 * NUM_PROCESSES
  batches = _global_batches(config, os.path.join(multi, "data", "train"), config.diffusion.train.num_steps)
  task = dataclasses.replace(diffusion.make_task(config, single, mesh), preview=None,
                             make_batches=lambda: iter(grain.MapDataset.source(batches).to_iter_dataset()))
  loop.train(task, config.diffusion.train, single, seed=config.seed, mesh=mesh)
  return single


@pytest.fixture(scope="module")
def sampled(two_processes):
  """The sampling logs of each process, after `sample` on the pair (G from two_processes)."""
  _, multi, logs = two_processes
  return _launch(multi, "sample", logs, via_env=True)


def test_losses_equal_a_single_process_run_on_the_same_global_batches(two_processes, one_process):
  (_, multi, _), single = two_processes, one_process
  mp_launch.assert_logs_match(_metrics(multi), _metrics(single), [2, 4], atol=1e-7)


def test_final_params_equal_a_single_process_run(two_processes, one_process):
  (config, multi, _), single = two_processes, one_process
  two, one = _final_state(config, multi), _final_state(config, single)
  mp_launch.assert_states_match(two, one, ("params", "ema_params", "opt_state"))


def test_only_process_0_writes_metrics_and_the_preview(two_processes):
  _, multi, _ = two_processes
  assert os.path.exists(os.path.join(multi, "samples", "diffusion_x0_step00000004.png"))
  metric_files = sorted(os.listdir(os.path.join(multi, "metrics", "diffusion_x0")))
  assert len(metric_files) == 1 and metric_files[0].startswith("events.out.tfevents.")


def test_both_processes_write_their_shards_and_together_hold_the_requested_count(two_processes, sampled):
  (config, multi, _), logs = two_processes, sampled
  num_real = records.read_manifest(os.path.join(multi, "data", "train"))["num_examples"]
  requested = resolved.pool_factor(config) * config.sample.per_real * num_real
  out = layout.synthetic_dir(multi, "diffusion_x0")
  manifest = records.read_manifest(out)
  assert manifest["num_examples"] == requested
  num_shards = len(manifest["shards"])
  assert num_shards == -(-requested // config.sample.examples_per_shard) >= NUM_PROCESSES
  for process, text in enumerate(logs):
    assert f"process {process} of 2 writes shards {list(range(process, num_shards, 2))}" in text
  source = records.PairSource(out)
  ids = [source[i]["id"] for i in range(len(source))]
  assert sorted(ids) == [f"synthetic_{i:07d}" for i in range(requested)]
  assert max(int(source[i]["mask"].max()) for i in range(len(source))) < config.data.num_classes
  assert os.path.exists(os.path.join(multi, "samples", "synthetic_grid.png"))
