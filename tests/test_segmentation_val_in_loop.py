"""Val mIoU during training: logged at every eval_every-th step, equal to --mode=evaluate's score of the
same step, invisible to training (same params, same batches, exact resume), and off at eval_every=0."""

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import TINY_SEGMENTER_RUN, load_config, run_main
from satsynth_jax import resolved, segmenter
from satsynth_jax.infra import parallel
from satsynth_jax.jobs import prepare
from satsynth_jax.train import loop, segmentation
from satsynth_jax.train.state import TrainState

# 4 steps, evaluated at 2 and 4; augmentation on, so a resume must replay the data order too.
# 8 val patches in one batch of 12: the last 4 rows are padding the evaluator must mask.
OVERRIDES = {**TINY_SEGMENTER_RUN, "data.augment": True, "segmentation.train.num_steps": 4,
             "segmentation.train.log_every": 1, "segmentation.train.checkpoint_every": 2, "segmentation.eval_every": 2,
             "segmentation.eval_batch_size": 12}
RUN = "unet_r0_s0"
VAL_KEYS = {"val_miou", "val_mf1"}


def read_log(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics", f"{RUN}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The tiny demo prepared, then a 4-step run with the evaluator on, as a user starts it."""
  workdir = str(tmp_path_factory.mktemp("val_in_loop"))
  prepare.run(load_config("demo", **OVERRIDES), workdir)
  run_main("train_segmentation", workdir, OVERRIDES)
  return workdir


def test_val_scores_are_logged_at_every_eval_step_only(straight):
  log = read_log(straight)
  val = [entry for entry in log if VAL_KEYS & entry.keys()]
  assert [entry["step"] for entry in val] == [2, 4]
  assert all(entry.keys() == {"step"} | VAL_KEYS for entry in val)  # the demo has no background class
  assert all(0.0 <= entry[key] <= 1.0 for entry in val for key in VAL_KEYS)
  assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3, 4]
  events = os.listdir(os.path.join(straight, "metrics", RUN))
  assert len(events) == 1 and b"val_miou" in open(os.path.join(straight, "metrics", RUN, events[0]), "rb").read()


def test_last_in_loop_score_equals_evaluate_on_the_last_checkpoint(straight):
  run_main("evaluate", straight, OVERRIDES)
  with open(os.path.join(straight, "metrics", f"eval_{RUN}.json"), encoding="utf-8") as f:
    summary = json.load(f)
  last = [entry for entry in read_log(straight) if "val_miou" in entry][-1]
  assert summary["checkpoint_step"] == last["step"] == 4
  assert last["val_miou"] == pytest.approx(summary["splits"]["val"]["scores"]["miou"], abs=1e-6)
  assert last["val_mf1"] == pytest.approx(summary["splits"]["val"]["scores"]["mf1"], abs=1e-6)


def test_resumed_run_with_the_evaluator_equals_the_uninterrupted_one(straight, tmp_path):
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("eval_*"))
  shutil.rmtree(resumed / "checkpoints" / RUN / "4")  # as if stopped right after step 2
  run_main("train_segmentation", resumed, OVERRIDES)
  config, mesh = load_config("demo", **OVERRIDES), parallel.make_mesh()
  run = resolved.SegmenterRun.from_config(config)
  (_, expected, step_a), (_, actual, step_b) = (segmenter.restore(config, w, run, mesh) for w in (straight, resumed))
  assert step_a == step_b == 4
  expected = traverse_util.flatten_dict(parallel.to_host(expected))
  actual = traverse_util.flatten_dict(parallel.to_host(actual))
  assert expected.keys() == actual.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(value, actual[path], err_msg="/".join(path))
  assert read_log(resumed) == read_log(straight)  # val points included, none twice


def test_eval_every_zero_builds_no_evaluator(tmp_path):
  config = load_config("demo", **{**OVERRIDES, "segmentation.eval_every": 0})
  task = segmentation.make_task(config, str(tmp_path), parallel.make_mesh(), resolved.SegmenterRun.from_config(config))
  assert task.evaluate is None and task.eval_every == 0


# ---- the loop's hook on a toy task: no segmenter to compile ----


def _toy_task(evaluate=None, eval_every=0) -> loop.Task:
  """w fitted to noisy targets; the noise comes from the step key, the batches from a grain iterator."""

  def init(rng):
    return TrainState.create({"w": jax.random.normal(rng, (3,))}, optax.sgd(0.1), rng, ema_decay=0.0)

  def step(state, batch):
    noise = jax.random.normal(state.step_rng(), batch.shape)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((batch - p["w"] + noise) ** 2))(state.params)
    return state.apply_gradients(grads), {"loss": loss}

  def make_batches():
    data = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    return iter(grain.MapDataset.source(data).seed(1).shuffle().repeat().batch(4).to_iter_dataset())

  return loop.Task(name="toy", init=init, step=step, make_batches=make_batches, evaluate=evaluate,
                   eval_every=eval_every)


def _train_toy(workdir, **task_kw):
  t = ml_collections.ConfigDict(dict(batch_size=4, num_steps=6, log_every=1, checkpoint_every=3,
                                     keep_checkpoints=3, sample_every=0))
  state = loop.train(_toy_task(**task_kw), t, str(workdir), seed=0, mesh=parallel.make_mesh(jax.devices()[:1]))
  with open(os.path.join(workdir, "metrics", "toy.jsonl"), encoding="utf-8") as f:
    return parallel.to_host(state.params["w"]), [json.loads(line) for line in f]


def test_loop_evaluates_at_multiples_of_eval_every_without_touching_training(tmp_path):
  seen = []

  def evaluate(state):
    seen.append(int(state.step))
    return {"val_w": jnp.sum(state.params["w"])}

  w_plain, log_plain = _train_toy(tmp_path / "plain")
  w_eval, log_eval = _train_toy(tmp_path / "eval", evaluate=evaluate, eval_every=2)
  np.testing.assert_array_equal(w_plain, w_eval)
  assert [entry for entry in log_eval if "loss" in entry] == log_plain
  assert seen == [2, 4, 6] and [entry["step"] for entry in log_eval if "val_w" in entry] == [2, 4, 6]
  _, log_off = _train_toy(tmp_path / "off", evaluate=evaluate, eval_every=0)
  assert seen == [2, 4, 6] and log_off == log_plain


def test_evaluators_of_equal_models_share_one_program(straight):
  """An experiment builds an Evaluator per run and split: equal models reuse one jitted eval step."""
  config, mesh = load_config("demo", **OVERRIDES), parallel.make_mesh()
  val, test = (os.path.join(straight, "data", split) for split in ("val", "test"))
  one = segmenter.Evaluator(config, segmenter.build(config, "unet"), val, mesh)
  assert segmenter.Evaluator(config, segmenter.build(config, "unet"), test, mesh)._step is one._step
  assert segmenter.Evaluator(config, segmenter.build(config, "fpn"), val, mesh)._step is not one._step
