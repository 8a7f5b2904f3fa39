"""Restores verify what they read: read errors, altered values and NaN/inf are refused in one line,
and with fallback allowed the newest earlier step that verifies is used, never silently."""

import glob
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from satsynth_jax.infra import checkpoint, parallel
from satsynth_jax.train.state import TrainState


def _init(rng):
  return TrainState.create({"w": jax.random.normal(rng, (64, 64))}, optax.adam(0.1), rng, ema_decay=0.5)


def _abstract():
  return jax.eval_shape(_init, jax.random.key(0))


def _inference_abstract():
  return {"params": _abstract().ema_params}


@pytest.fixture
def fallback():
  """checkpoint.configure(allow_fallback=True) for one test, as --allow_checkpoint_fallback does."""
  checkpoint.configure(allow_fallback=True)
  yield
  checkpoint.configure(allow_fallback=False)


@pytest.fixture
def run(tmp_path):
  """A run with steps 1, 2 and 3, each a distinct state (step = its number)."""
  directory = tmp_path / "run"
  mngr = checkpoint.manager(directory, max_to_keep=None)
  state = _init(jax.random.key(0))
  for step in (1, 2, 3):
    state = state.replace(step=state.step + 1, params={"w": state.params["w"] + 1.0},
                          ema_params={"w": state.ema_params["w"] + 1.0})
    checkpoint.save(mngr, step, state, meta={"step": step})
  mngr.wait_until_finished()
  return directory


def _mesh():
  return parallel.make_mesh(jax.devices()[:1])


def _data_file(directory, step, item):
  """The largest file of `item`'s own OCDBT store: array data (B-tree nodes are a few hundred bytes)."""
  return max(glob.glob(str(directory / str(step) / item / "ocdbt.process_*" / "d" / "*")), key=os.path.getsize)


def _rewrite_item(directory, step, item, tree):
  """Replace an item's files with a valid store of other values: the read succeeds, the numbers differ."""
  target = directory / str(step) / item
  scratch = directory.parent / f"scratch_{item}"
  with ocp.StandardCheckpointer() as saver:
    saver.save(scratch, tree)
  shutil.rmtree(target)
  shutil.copytree(scratch, target)


def test_a_clean_run_restores_and_verifies(run):
  state, meta = checkpoint.restore(checkpoint.manager(run, create=False), _abstract())
  assert int(state.step) == 3 and meta["step"] == 3
  assert set(meta[checkpoint.DIGEST_KEY]) == {"state", "inference"}
  variables, step = checkpoint.restore_inference(run, _inference_abstract(), _mesh())
  assert step == 3
  np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), np.asarray(state.ema_params["w"]))


def test_altered_values_that_read_without_error_are_refused(run):
  variables, _ = checkpoint.restore_inference(run, _inference_abstract(), _mesh())
  _rewrite_item(run, 3, "inference", {"params": {"w": np.asarray(variables["params"]["w"]) * 0.0}})
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=re.escape(f"{run}/3: unreadable or damaged (inference sha256 differs from the one "
                                     "recorded at save time: altered bytes); re-run with "
                                     "--allow_checkpoint_fallback to use step 2")):
    checkpoint.restore_inference(run, _inference_abstract(), _mesh())


@pytest.mark.parametrize("damage", ["truncate", "delete", "invert"])
def test_damaged_files_are_refused_in_one_line(run, damage):
  path = _data_file(run, 3, "state")
  if damage == "truncate":
    os.truncate(path, os.path.getsize(path) // 2)
  elif damage == "delete":
    os.unlink(path)
  else:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:16] + bytes(b ^ 0xFF for b in data[16:]))
  with pytest.raises(checkpoint.CheckpointDamagedError) as raised:
    checkpoint.restore(checkpoint.manager(run, create=False), _abstract())
  message = str(raised.value)
  assert "\n" not in message and len(message) < 500
  assert message.startswith(f"{run}/3: unreadable or damaged (")
  assert message.endswith("re-run with --allow_checkpoint_fallback to use step 2 (or the newest earlier step "
                          "that verifies), or delete it")


def test_non_finite_values_are_refused_naming_the_leaf(tmp_path):
  mngr = checkpoint.manager(tmp_path / "run")
  state = _init(jax.random.key(0))
  checkpoint.save(mngr, 1, state.replace(params={"w": state.params["w"] * np.nan}))
  mngr.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=r"/1: unreadable or damaged \(non-finite values in state params/w\); no earlier step"):
    checkpoint.restore(mngr, _abstract())


def test_a_damaged_meta_json_is_refused(run):
  (run / "3" / "meta" / "metadata").write_text("{not json")
  with pytest.raises(checkpoint.CheckpointDamagedError, match=r"/3: unreadable or damaged \("):
    checkpoint.restore_inference(run, _inference_abstract(), _mesh())


def test_fallback_uses_the_newest_earlier_step_that_verifies_and_logs_each_skip(run, fallback, caplog):
  os.unlink(_data_file(run, 3, "state"))
  os.unlink(_data_file(run, 2, "state"))
  with caplog.at_level(logging.WARNING):
    state, meta = checkpoint.restore(checkpoint.manager(run, create=False), _abstract())
  assert int(state.step) == 1 and meta["step"] == 1
  skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(skips) == 2
  assert f"{run}/3 skipped" in skips[0] and "trying step 2" in skips[0]
  assert f"{run}/2 skipped" in skips[1] and "trying step 1" in skips[1]


def test_fallback_never_replaces_a_step_asked_for_by_number(run, fallback):
  os.unlink(_data_file(run, 2, "inference"))
  with pytest.raises(checkpoint.CheckpointDamagedError, match=r"/2: .*choose another saved step \(\[1, 2, 3\]\)"):
    checkpoint.restore_inference(run, _inference_abstract(), _mesh(), step=2)


def test_when_no_step_verifies_fallback_says_so(run, fallback):
  for step in (1, 2, 3):
    os.unlink(_data_file(run, step, "inference"))
  with pytest.raises(checkpoint.CheckpointDamagedError, match=r"no step verifies \(tried \[3, 2, 1\]"):
    checkpoint.restore_inference(run, _inference_abstract(), _mesh())


def test_checkpoints_saved_before_digests_still_restore(run):
  meta_path = run / "3" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  del meta[checkpoint.DIGEST_KEY]
  meta_path.write_text(json.dumps(meta))
  state, _ = checkpoint.restore(checkpoint.manager(run, create=False), _abstract())
  assert int(state.step) == 3


def test_set_aside_moves_skipped_steps_out_of_the_way(run):
  mngr = checkpoint.manager(run, max_to_keep=None)
  moved = checkpoint.set_aside(mngr, 1)
  assert [os.path.basename(p) for p in moved] == ["2.damaged", "3.damaged"]
  assert mngr.all_steps() == [1]
  checkpoint.save(mngr, 2, _init(jax.random.key(1)))  # the step number is free again
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1, 2]


_ECHO_SCRIPT = r"""
import ctypes, sys, threading
from satsynth_jax.infra import checkpoint

def callbacks():  # PyRun_SimpleString reports its error with PyErr_Print, as tensorstore's callbacks do
  ctypes.pythonapi.PyRun_SimpleString(
      b"import asyncio; loop = asyncio.new_event_loop(); loop.close(); loop.call_soon_threadsafe(print)")
  ctypes.pythonapi.PyRun_SimpleString(b"raise ValueError('an unrelated failure')")

SETUP
thread = threading.Thread(target=callbacks)
thread.start()
thread.join()
print("done", file=sys.stderr)
"""


@pytest.mark.parametrize("setup", ['checkpoint._abandoned.watch("/nowhere/7")', "checkpoint._abandoned.install()"])
def test_callbacks_of_abandoned_reads_print_no_traceback(setup):
  """CI saw orbax's abandoned reads, after a damaged checkpoint was reported in one line, print
  'Event loop is closed' tracebacks through PyErr_Print (sys.excepthook); only those are dropped.
  A read installs the hooks before it starts (`install`): sibling reads of a failing one could echo
  before its error reached `watch`."""
  import subprocess
  import sys
  script = _ECHO_SCRIPT.replace("SETUP", setup)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Event loop is closed" not in result.stderr, result.stderr[-2000:]
  assert "ValueError: an unrelated failure" in result.stderr  # anything else still reaches the user
  assert result.stderr.rstrip().endswith("done")


def test_a_replicated_state_on_cpu_saves_whole_without_compiling_slices(tmp_path, monkeypatch):
  """orbax's replica-parallel save slices each replicated array across its replicas, one compiled
  program per slice; on CPU every replica is in one host's memory, so infra/checkpoint.py turns it off."""
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  state = jax.device_put(_init(jax.random.key(0)), parallel.replicated(mesh))
  slices = []
  real_slice = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a) or real_slice(*a, **k))
  mngr = checkpoint.manager(tmp_path / "run")
  checkpoint.save(mngr, 1, state, meta={"step": 1})
  mngr.wait_until_finished()
  assert slices == []
  restored, _ = checkpoint.restore(checkpoint.manager(tmp_path / "run", create=False), _abstract())
  np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(state.params["w"]))
