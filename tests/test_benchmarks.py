"""Smoke runs of the benchmark scripts at toy sizes: they run end to end and report positive figures."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common
from conftest import TINY_G

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SAMPLING = {
    **TINY_G, "sample.per_real": 1, "sample.ddim_steps": 2, "sample.batch_size": 8, "sample.examples_per_shard": 8,
}


def table_rows(text: str) -> list[list[str]]:
  """The cells of every markdown table row in `text` (header and separator rows included)."""
  return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
          if line.startswith("|")]


def positive(cell: str) -> bool:
  return bool(re.fullmatch(r"[0-9.e+-]+", cell)) and float(cell) > 0


def test_accelerator_script_appends_a_section_with_every_row(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n")
  # No time budget here: on a shared CPU the toy compiles can take minutes, and every row must appear.
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", ACCELERATOR_TIMEOUT_S="1800")
  done = subprocess.run(["bash", "benchmarks/accelerator.sh", "--tiny", "--no-peer", "--budget_s=1e9",
                         f"--output={results}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  text = results.read_text()
  assert text.startswith("# Benchmark results\n")  # appended, never rewritten
  section = text.split("\n## ", 1)[1]
  assert "accelerator check on cpu" in section and "skipped for the time budget: none" in section
  rows = {(r[1], r[2]): r for r in table_rows(section)[2:]}
  expected = [(p, d) for d in ("float32", "bfloat16")
              for p in ("train step", "DDIM 4 steps", "DDPM 50 steps (extrapolated from 2)")]
  assert set(expected) <= set(rows), sorted(rows)
  for program, dtype in expected + [("train step", "float32")]:
    row = rows[(program, dtype)]
    assert all(positive(c) for c in row[4:7]), row  # GFLOP/img, img/s, % peak
    assert row[8] == "-" and row[9] == "-"  # no peer timed
  assert any(r[0].startswith("FPN") for r in table_rows(section)[2:])


def test_sampling_benchmark_compares_sample_mode_with_the_bare_sampler(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  sys.path.insert(0, REPO)
  from benchmarks import sampling  # pylint: disable=g-import-not-at-top
  args = ["--rounds=1", f"--workdir={tmp_path / 'workdir'}"]
  args += [f"--set={k}={v!r}" for k, v in TINY_SAMPLING.items()]
  text = sampling.main(args)
  rows = table_rows(text)[2:]
  assert [r[0].split(" ")[0] for r in rows] == ["`--mode=sample`", "jitted"]
  assert rows[0][1] == rows[1][1] and int(rows[0][1]) > 0  # the same pairs on both sides
  for row in rows:
    assert positive(row[4]) and positive(row[5]) and positive(row[6]), row


def test_xla_flags_classifies_convolutions_from_hlo():
  sys.path.insert(0, REPO)
  from benchmarks import xla_flags  # pylint: disable=g-import-not-at-top
  hlo = """HloModule m
%fused_computation.1 (p: f32[16,32,32,64], q: f32[16,32,32,64]) -> f32[64,3,3,64] {
  ROOT %c = f32[64,3,3,64]{3,2,1,0} convolution(%p, %q), window={size=32x32 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(s)/transpose(jvp(UNet))/conv1/conv_general_dilated"}
}
%fused_computation.2 (p: f32[16,32,32,64], q: f32[3,3,64,64]) -> f32[16,32,32,64] {
  ROOT %c = f32[16,32,32,64]{3,2,1,0} convolution(%p, %q), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(s)/transpose(jvp(UNet))/conv1/conv_general_dilated"}
}
%fused_computation.3 (p: f32[16,32,32,64], q: f32[3,3,64,64]) -> f32[16,32,32,64] {
  ROOT %c = f32[16,32,32,64]{3,2,1,0} convolution(%p, %q), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(s)/jvp(UNet)/conv1/conv_general_dilated"}
}
ENTRY %main (a: f32[16,32,32,64], w: f32[3,3,64,64]) -> f32[16,32,32,64] {
  %ynn_fusion.1 = f32[64,3,3,64]{3,2,1,0} fusion(%a, %a), kind=kCustom, calls=%fused_computation.1
  %ynn_fusion.2 = f32[16,32,32,64]{3,2,1,0} fusion(%a, %w), kind=kCustom, calls=%fused_computation.2
  ROOT %ynn_fusion.3 = f32[16,32,32,64]{3,2,1,0} fusion(%a, %w), kind=kCustom, calls=%fused_computation.3
}
"""
  kinds = xla_flags.hlo_kinds(hlo)
  assert kinds["ynn_fusion.1"] == "conv backward-filter"
  assert kinds["ynn_fusion.2"] == "conv backward-input"
  assert kinds["ynn_fusion.3"] == "conv forward"


def test_worker_runner_returns_the_result_line_or_names_the_failure():
  talk = "print('noise'); print('RESULT {\"ms\": 1.5}')"
  assert common.run_worker([sys.executable, "-c", talk], dict(os.environ), "ok") == {"ms": 1.5}
  with pytest.raises(RuntimeError, match=r"worker failed \(2 devices, rc 3\): .*boom"):
    common.run_worker([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                      dict(os.environ), "2 devices")


def test_edge_profile_finds_a_drawn_frame_at_its_ring_and_none_in_flat_texture(tmp_path):
  from benchmarks import edge_profile  # pylint: disable=g-import-not-at-top
  from satsynth_jax.data import records  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  textured = rng.integers(90, 110, (6, 32, 32, 3)).astype(np.uint8)
  framed = textured.copy()
  framed[:, 2, 2:30] = framed[:, 29, 2:30] = framed[:, 2:30, 2] = framed[:, 2:30, 29] = 200  # ring 2
  for name, images in (("real", textured), ("framed", framed)):
    pairs = (records.Pair(image=im, mask=np.zeros((32, 32), np.uint8), id=f"p{i}", source="test", num_classes=2)
             for i, im in enumerate(images))
    records.write_records(tmp_path / name, pairs, num_classes=2, class_names=["a", "b"], source="test",
                          examples_per_shard=8)
  text = edge_profile.main([str(tmp_path / "real"), str(tmp_path / "framed"), "--rings=4"])
  rows = {row[0]: [float(c) for c in row[2:]] for row in table_rows(text)[2:]}
  real, framed_steps = rows[str(tmp_path / "real")], rows[str(tmp_path / "framed")]
  assert max(real) < 3  # noise only: ring means of 20-level noise differ by about one level
  assert framed_steps[1] > 50 and framed_steps[2] > 50  # the frame's ring steps up from ring 1 and down to 3
  assert max(framed_steps[0], framed_steps[3]) < 3
  np.testing.assert_array_equal(edge_profile.ring_index(4), [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
