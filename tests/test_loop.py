"""The shared training loop: resume equals uninterrupted, NaN stops cleanly, SIGTERM saves, a damaged
checkpoint stops the resume (or, when allowed, is skipped)."""

import functools
import glob
import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from satsynth_jax import resolved
from satsynth_jax.infra import checkpoint, parallel, workdir as layout
from satsynth_jax.train import loop, optim
from satsynth_jax.train.state import TrainState


def _train_config(**kw):
  t = ml_collections.ConfigDict(dict(batch_size=8, num_steps=6, log_every=1, checkpoint_every=3,
                                     keep_checkpoints=5, sample_every=0))
  t.update(kw)
  return t


def _linear_task(data, poison_after=None, on_batch=None):
  """y = x @ w regression whose batches come from a checkpointable grain iterator."""

  def init(rng):
    params = {"w": jax.random.normal(rng, (4, 1))}
    return TrainState.create(params, optax.adam(0.05), rng, ema_decay=0.5)

  def step(state, batch):
    noise = jax.random.normal(state.step_rng(), batch["y"].shape) * 0.01  # uses the per-step key

    def loss_fn(p):
      return jnp.mean((batch["x"] @ p["w"] - batch["y"] - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}

  def make_batches():
    x, y = data
    def poison(i, ex):
      if poison_after is not None and i >= poison_after:
        ex = dict(ex, y=ex["y"] * np.nan)
      return ex
    ds = grain.MapDataset.range(len(x)).shuffle(seed=1).repeat().map_with_index(
        lambda i, j: poison(i // 8, {"x": x[j], "y": y[j]})).batch(8)
    it = iter(ds.to_iter_dataset())
    if on_batch is None:
      return it
    return _Hooked(it, on_batch)

  return loop.Task(name="toy", init=init, step=step, make_batches=make_batches)


class _Hooked:
  """Iterator wrapper that calls on_batch(n) before the n-th batch (1-based), keeping grain state."""

  def __init__(self, it, on_batch):
    self.it, self.on_batch, self.n = it, on_batch, 0

  def __next__(self):
    self.n += 1
    self.on_batch(self.n)
    return next(self.it)

  # grain's orbax handler stores non-grain iterators' state as bytes.
  def get_state(self) -> bytes:
    return json.dumps(self.it.get_state()).encode()

  def set_state(self, state: bytes):
    self.it.set_state(json.loads(state))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 4)).astype(np.float32)
  return x, (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32))


def _params(state):
  return np.asarray(state.params["w"]), np.asarray(state.ema_params["w"])


def test_resume_gives_the_same_params_as_an_uninterrupted_run(tmp_path, data):
  full = loop.train(_linear_task(data), _train_config(), str(tmp_path / "a"), seed=0)
  half = loop.train(_linear_task(data), _train_config(num_steps=3), str(tmp_path / "b"), seed=0)
  assert int(half.step) == 3
  resumed = loop.train(_linear_task(data), _train_config(), str(tmp_path / "b"), seed=0)
  assert int(resumed.step) == int(full.step) == 6
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  lines = (tmp_path / "b" / "metrics" / "toy.jsonl").read_text().splitlines()
  assert len(lines) == 6  # 3 + 3 logged steps, none repeated
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "b" / "metrics" / "toy"))


def test_four_devices_match_one_device(tmp_path, data):
  assert jax.device_count() == 4
  one = loop.train(_linear_task(data), _train_config(), str(tmp_path / "one"), seed=0,
                   mesh=parallel.make_mesh(jax.devices()[:1]))
  four = loop.train(_linear_task(data), _train_config(), str(tmp_path / "four"), seed=0)
  for a, b in zip(_params(one), _params(four)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_devices_is_refused(tmp_path, data):
  with pytest.raises(ValueError, match=r"config.train.batch_size=6 is not divisible by the 4 devices"):
    loop.train(_linear_task(data), _train_config(batch_size=6), str(tmp_path), seed=0)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
  task = _linear_task(data, poison_after=4)  # batches 5.. carry NaN targets
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"non-finite metrics at step 5.*This run started fresh; its newest checkpoint is step 3"):
    loop.train(task, _train_config(), str(tmp_path), seed=0)
  mngr = checkpoint.manager(layout.checkpoint_dir(str(tmp_path), "toy"))
  assert mngr.all_steps() == [3]
  restored, _ = checkpoint.restore(mngr, jax.eval_shape(task.init, jax.random.key(0)))
  assert np.isfinite(np.asarray(restored.params["w"])).all()


# The NaN lands exactly on a checkpoint step (3, the first; 6, the last): the loop must check the
# metrics before it saves, or the poisoned params (NaN after the update) become the newest checkpoint.
@pytest.mark.parametrize("poison_after, kept", [(2, []), (5, [3])])
def test_nan_on_a_checkpoint_step_is_never_saved(tmp_path, data, poison_after, kept):
  step = poison_after + 1
  task = _linear_task(data, poison_after=poison_after)
  newest = "no checkpoint was saved" if not kept else f"its newest checkpoint is step {kept[-1]}"
  with pytest.raises(loop.NonFiniteLossError, match=rf"non-finite metrics at step {step}: .*{newest}"):
    loop.train(task, _train_config(), str(tmp_path), seed=0)
  run = layout.checkpoint_dir(str(tmp_path), "toy")
  assert sorted(os.listdir(run)) == [str(s) for s in kept]  # nor any partial (tmp) step folder
  mngr = checkpoint.manager(run)
  assert mngr.all_steps() == kept
  for s in kept:
    restored, _ = checkpoint.restore(mngr, jax.eval_shape(task.init, jax.random.key(0)), step=s)
    floats = jax.tree.leaves((restored.params, restored.ema_params, restored.opt_state))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in floats)


def _logged_losses(workdir) -> np.ndarray:
  return np.array([json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics", "toy.jsonl"))])


def test_logged_loss_is_finite_and_falls(tmp_path, data):
  loop.train(_linear_task(data), _train_config(num_steps=12), str(tmp_path), seed=0)
  losses = _logged_losses(str(tmp_path))
  assert len(losses) == 12 and np.isfinite(losses).all()
  assert losses[-4:].mean() < losses[:4].mean()


def test_sigterm_saves_then_stops_and_the_rerun_finishes(tmp_path, data):
  def terminate(n):
    if n == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop.TrainingInterrupted, match="SIGTERM at step 2; checkpoint saved"):
    loop.train(_linear_task(data, on_batch=terminate), _train_config(), str(tmp_path / "b"), seed=0)
  assert checkpoint.manager(layout.checkpoint_dir(str(tmp_path / "b"), "toy")).all_steps() == [2]
  resumed = loop.train(_linear_task(data), _train_config(), str(tmp_path / "b"), seed=0)
  full = loop.train(_linear_task(data), _train_config(), str(tmp_path / "a"), seed=0)
  np.testing.assert_array_equal(_params(full)[0], _params(resumed)[0])


def test_missing_checkpoint_names_the_directory(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / "checkpoints" / "g"))
  with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"no checkpoint in .*checkpoints/g"):
    checkpoint.resolve_step(mngr, None)


def test_nan_after_a_resume_names_the_step_it_resumed_from(tmp_path, data):
  loop.train(_linear_task(data), _train_config(num_steps=3), str(tmp_path), seed=0)
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"non-finite metrics at step 4.*This run resumed from step 3; its newest checkpoint "
                           r"is step 3 .*verified when a re-run resumes"):
    loop.train(_linear_task(data, poison_after=1), _train_config(), str(tmp_path), seed=0)


def _damage_latest_state(workdir, step):
  """Delete the data files of a step's state (orbax's OCDBT stores; tiny arrays sit inline in the
  B-tree nodes of the merged store): the step no longer reads."""
  directory = layout.checkpoint_dir(workdir, "toy") / str(step) / "state"
  for name in glob.glob(str(directory / "d" / "*")) + glob.glob(str(directory / "ocdbt.process_*" / "d" / "*")):
    os.unlink(name)


def test_a_damaged_latest_checkpoint_stops_the_resume_in_one_line(tmp_path, data):
  loop.train(_linear_task(data), _train_config(), str(tmp_path), seed=0)
  _damage_latest_state(str(tmp_path), 6)
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=r"toy/6: unreadable or damaged \(.*\); re-run with --allow_checkpoint_fallback to use "
                           r"step 3"):
    loop.train(_linear_task(data), _train_config(num_steps=9), str(tmp_path), seed=0)


def test_with_fallback_a_resume_skips_the_damaged_step_and_matches_an_uninterrupted_run(tmp_path, data):
  loop.train(_linear_task(data), _train_config(), str(tmp_path / "b"), seed=0)
  _damage_latest_state(str(tmp_path / "b"), 6)
  checkpoint.configure(allow_fallback=True)
  try:
    resumed = loop.train(_linear_task(data), _train_config(num_steps=9), str(tmp_path / "b"), seed=0)
  finally:
    checkpoint.configure(allow_fallback=False)
  full = loop.train(_linear_task(data), _train_config(num_steps=9), str(tmp_path / "a"), seed=0)
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  run = layout.checkpoint_dir(str(tmp_path / "b"), "toy")
  assert (run / "6.damaged").is_dir()
  assert checkpoint.manager(run).all_steps() == [3, 6, 9]


# ---- shared jitted steps: an experiment's seeds and arms trace and compile their step once ----

TRACES = []


def _counted_step(state, batch, *, rate):
  TRACES.append(rate)  # runs when jax traces the step, not when the compiled step runs
  loss, grads = jax.value_and_grad(lambda p: jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2))(state.params)
  return state.apply_gradients(jax.tree.map(lambda g: g * rate, grads)), {"loss": loss}


def _init(rng, *, t):
  tx, _ = optim.make_optimizer(t)  # equal settings, the same optimizer object: equal TrainState treedefs
  return TrainState.create({"w": jax.random.normal(rng, (4, 1))}, tx, rng, ema_decay=0.5)


def _partial_task(data, rate=1.0):
  """A task built afresh, as each experiment run builds its own: new partials over equal values."""
  t = ml_collections.ConfigDict(dict(optimizer="adam", lr=0.05, schedule="constant", num_steps=6, warmup_steps=0,
                                     grad_clip=1.0))
  return loop.Task(name="toy", init=functools.partial(_init, t=t), step=functools.partial(_counted_step, rate=rate),
                   make_batches=_linear_task(data).make_batches)


def test_runs_with_equal_steps_trace_the_step_once(tmp_path, data):
  TRACES.clear()
  states = [loop.train(_partial_task(data), _train_config(), str(tmp_path / f"s{seed}"), seed=seed)
            for seed in (0, 1, 0)]
  assert TRACES == [1.0]
  for a, b in zip(_params(states[0]), _params(states[2])):  # the shared program changes nothing
    np.testing.assert_array_equal(a, b)
  loop.train(_partial_task(data, rate=0.5), _train_config(), str(tmp_path / "other"), seed=0)
  assert TRACES == [1.0, 0.5]  # another step value: traced anew


LOWERINGS = []  # a first call lowers its program (then compiles it, or finds it in the persistent cache)
jax.monitoring.register_event_duration_secs_listener(  # listeners cannot be removed: one for the module
    lambda event, seconds, **_: LOWERINGS.append(event) if event.endswith("jaxpr_to_mlir_module_duration") else None)


def _fresh_start(task, mesh):
  """(jitted step, first batch, state) as loop.train starts a fresh run: the step compiled beside init."""
  step_fn = loop.compile_step(task, mesh)
  batch = parallel.to_global(next(task.make_batches()), mesh)
  return step_fn, batch, loop.init_while_step_compiles(task, mesh, 0, step_fn, batch)


def test_a_fresh_run_compiles_its_step_while_init_runs(data):
  task, mesh = _partial_task(data, rate=0.25), parallel.make_mesh()  # a rate no other test compiles
  step_fn, batch, state = _fresh_start(task, mesh)
  lowered = len(LOWERINGS)
  with jax.set_mesh(mesh):
    stepped, _ = step_fn(state, batch)
  assert len(LOWERINGS) == lowered  # the loop's first call ran the program compiled beside init
  plain, _ = jax.jit(task.step)(loop.init_state(task, mesh, 0), batch)
  np.testing.assert_allclose(stepped.params["w"], plain.params["w"], rtol=1e-6)


@pytest.mark.parametrize("model", ["g", "segmenter"])
def test_a_fresh_run_compiles_its_preview_or_evaluator_beside_its_step(tmp_path, model):
  """task.warm_up runs while the step compiles: the first preview grid or val score compiles nothing."""
  from conftest import TINY_G, TINY_SEGMENTER, load_config
  from satsynth_jax.jobs import prepare
  from satsynth_jax.train import diffusion, segmentation
  mesh, workdir = parallel.make_mesh(), str(tmp_path)
  if model == "g":  # sizes no other test compiles
    config = load_config("demo", **TINY_G, **{"diffusion.train.sample_every": 1, "diffusion.train.num_grid_samples": 3})
  else:
    config = load_config("demo", **TINY_SEGMENTER, **{"segmentation.base_width": 8, "segmentation.eval_every": 1,
                                                      "segmentation.eval_batch_size": 8})
  prepare.run(config, workdir)
  task = (diffusion.make_task(config, workdir, mesh) if model == "g" else
          segmentation.make_task(config, workdir, mesh, resolved.SegmenterRun.from_config(config)))
  step_fn, batch, state = _fresh_start(task, mesh)
  lowered = len(LOWERINGS)
  with jax.set_mesh(mesh):
    state, _ = step_fn(state, batch)
    if model == "g":
      task.preview(state, 1)
      assert glob.glob(os.path.join(workdir, "samples", "*_step00000001.png"))
    else:
      assert 0.0 <= task.evaluate(state)["val_miou"] <= 1.0
  assert len(LOWERINGS) == lowered


def test_shared_jit_keys_on_values():
  assert parallel.shared_jit(jnp.sin) is parallel.shared_jit(jnp.sin)
  mesh = parallel.make_mesh()
  config = lambda lr: ml_collections.ConfigDict(dict(lr=lr, sizes=(1, 2)))
  step = lambda **kw: loop.Task("t", init=None, step=functools.partial(_counted_step, **kw), make_batches=None)
  one = loop.compile_step(step(rate=config(1.0)), mesh)
  assert loop.compile_step(step(rate=config(1.0)), mesh) is one
  assert loop.compile_step(step(rate=config(2.0)), mesh) is not one
  assert loop.compile_step(step(rate=config(1.0)), parallel.make_mesh(jax.devices()[:1])) is not one
  weights = jnp.ones(3)  # arrays have no hash: such a step is jitted afresh every time
  assert loop.compile_step(step(rate=weights), mesh) is not loop.compile_step(step(rate=weights), mesh)


@pytest.mark.parametrize("model", ["fpn", "unet"])
def test_init_compiled_at_o1_gives_the_state_of_xla_default(model):
  """loop.init_state compiles at LLVM -O1 (INIT_CPU_COMPILER_OPTIONS): the same bits as -O2, XLA's default."""
  from conftest import TINY_G, load_config
  from satsynth_jax.train import diffusion, segmentation
  mesh = parallel.make_mesh()
  if model == "fpn":
    config = load_config("demo")
    task = segmentation.make_task(config, "unused", mesh, resolved.SegmenterRun.arm(config, 0, 0, None))
  else:
    config = load_config("demo", **TINY_G, **{"diffusion.train.sample_every": 0})
    task = diffusion.make_task(config, "unused", mesh)
  ours = loop.init_state(task, mesh, seed=3)
  default = jax.jit(task.init).lower(jax.random.key(3)).compile(
      compiler_options={"xla_backend_optimization_level": 2})(jax.random.key(3))
  numbers = lambda state: (state.params, state.opt_state, state.ema_params, state.batch_stats)
  jax.tree.map(np.testing.assert_array_equal, numbers(ours), numbers(default))
