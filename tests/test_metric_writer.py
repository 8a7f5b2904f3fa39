"""MetricWriter: JSON lines and TensorBoard events; a resumed run's log reads as one run."""

import json
import pathlib

import pytest

from satsynth_jax.data import tfrecord
from satsynth_jax.infra.metric_writer import MetricWriter


def log_steps(directory: pathlib.Path, steps, resume_step=None, loss=1.0) -> None:
  writer = MetricWriter(directory, "task", resume_step=resume_step)
  for step in steps:
    writer.scalars(step, {"loss": loss * step})
  writer.close()


def jsonl(directory: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (directory / "task.jsonl").read_text().splitlines()]


def test_resume_drops_the_steps_logged_after_the_checkpoint(tmp_path):
  log_steps(tmp_path, [2, 4, 6, 8])  # checkpoint at 4, then killed (kill -9) after logging 6 and 8
  with open(tmp_path / "task.jsonl", "a") as file:
    file.write('{"step": 10, "lo')  # a line cut short by the kill
  log_steps(tmp_path, [6, 8, 10], resume_step=4, loss=2.0)
  assert [(e["step"], e["loss"]) for e in jsonl(tmp_path)] == [(2, 2.0), (4, 4.0), (6, 12.0), (8, 16.0), (10, 20.0)]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the atomic rewrite left no temp file


def test_no_resume_step_appends_and_a_fresh_start_clears_the_log(tmp_path):
  log_steps(tmp_path, [1, 2])
  log_steps(tmp_path, [3])
  assert [e["step"] for e in jsonl(tmp_path)] == [1, 2, 3]
  log_steps(tmp_path, [1], resume_step=0)  # no checkpoint: the old run's lines are stale
  assert [e["step"] for e in jsonl(tmp_path)] == [1]


def test_disabled_writer_touches_nothing(tmp_path):
  writer = MetricWriter(tmp_path / "m", "task", enabled=False, resume_step=3)
  writer.scalars(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "m").exists()


def test_events_parse_as_tensorflow_events_with_a_session_start_on_resume(tmp_path):
  event_pb2 = pytest.importorskip("tensorflow.core.util.event_pb2", reason="needs TensorFlow's Event proto")
  log_steps(tmp_path, [5], resume_step=4)
  (events_file,) = (tmp_path / "task").iterdir()
  events = [event_pb2.Event.FromString(data) for data in tfrecord.iter_records(events_file)]
  assert events[0].file_version == "brain.Event:2"
  # TensorBoard drops the earlier run's points from this step on.
  assert (events[1].step, events[1].session_log.status) == (5, event_pb2.SessionLog.START)
  (value,) = events[2].summary.value
  assert (events[2].step, value.tag, value.simple_value) == (5, "loss", 5.0)
