"""The command line refuses bad configs and modes in one line that names the culprit."""

import subprocess
import sys

import pytest

from conftest import REPO
from satsynth_jax.main import MODES


def run_cli(*args, workdir="unused"):
  cmd = [sys.executable, "-m", "satsynth_jax.main", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config=configs/demo.py", "--mode=prepare", "--config.data.patch_sze=32"],
         "unknown config key --config.data.patch_sze (did you mean patch_size?)"),
        (["--config=configs/demo.py", "--mode=prepare", "--config.data.num_classes=1"],
         "config.data.num_classes=1: must be an int in [2, 65535]"),
        (["--config=configs/demo.py", "--mode=prepare", "--config.data.patch_size=abc"],
         "--config.data.patch_size=abc"),
        (["--config=configs/demo.py", "--mode=prepare", "--config.data.label_encoding=gray"],
         "config.data.label_encoding='gray'"),
        (["--config=configs/demo.py", "--mode=fly"], f"unknown --mode='fly'; available modes: {', '.join(MODES)}"),
        (["--config=configs/nope.py", "--mode=prepare"], "configs/nope.py"),
        (["--mode=prepare"], "--config is required"),
        (["--config=configs/loveda.py:nope", "--mode=prepare"], "unknown config preset 'nope'; presets: paper, cpu"),
    ],
)
def test_bad_command_lines_fail_in_one_named_line(args, expected):
  result = run_cli(*args)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("satsynth_jax: error: ")
  assert expected in lines[0]
