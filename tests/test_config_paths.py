"""Packaging: `--config=configs/X.py[:preset]` works from any folder (the configs install as
satsynth_jax.configs, the only top-level package), and every dependency and extra is one the code uses."""

import ast
import importlib.metadata
import json
import pathlib
import re
import site
import subprocess
import sys

import pytest

import satsynth_jax.configs
from conftest import REPO
from satsynth_jax.data import records

# The installed metadata: not a satsynth_jax.egg-info that a build may leave, stale, in the checkout
# (which pytest puts first on sys.path).
DIST = next(importlib.metadata.distributions(name="satsynth_jax", path=site.getsitepackages()))
# Beside the interpreter, as pip installs console scripts (.venv/bin/satsynth).
CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "satsynth"
TINY_DEMO = ["--config.data.demo_num_scenes=2", "--config.data.demo_scene_size=64", "--config.data.patch_size=32"]


def run_elsewhere(command, folder, *args):
  """The command line from `folder` (not the checkout), as a user of an installed package runs it."""
  return subprocess.run([*command, *args], cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [[sys.executable, "-m", "satsynth_jax.main"], [str(CONSOLE_SCRIPT)]],
                         ids=["python-m", "console-script"])
def test_a_config_path_resolves_from_any_folder(tmp_path, command):
  result = run_elsewhere(command, tmp_path, "--config=configs/demo.py:cpu", "--mode=prepare", "--workdir=w",
                         *TINY_DEMO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not (tmp_path / "configs").exists()  # nothing to find here: the installed configs were used
  for split, scenes in (("train", 2), ("val", 2)):  # val: a quarter as many scenes, at least 2
    manifest = json.loads((tmp_path / "w" / "data" / split / records.MANIFEST).read_text())
    assert manifest["source"] == "demo" and manifest["num_examples"] == scenes * 4  # 64 px scenes, 32 px patches
  assert "train: 2 scenes -> 8 patches" in result.stdout


def test_the_preset_reaches_the_installed_config(tmp_path):
  result = run_elsewhere([sys.executable, "-m", "satsynth_jax.main"], tmp_path, "--config=configs/loveda.py:nope",
                         "--mode=prepare", "--workdir=w")
  assert result.returncode == 2
  assert "unknown config preset 'nope'; presets: paper, cpu" in result.stderr


@pytest.mark.parametrize("config", ["configs/nope.py", "configs/nope.py:cpu"])
def test_a_config_found_nowhere_fails_in_one_line_naming_where_it_looked(tmp_path, config):
  result = run_elsewhere([sys.executable, "-m", "satsynth_jax.main"], tmp_path, f"--config={config}",
                         "--mode=prepare", "--workdir=w", *TINY_DEMO)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert lines[0].startswith("satsynth_jax: error: ") and "no config file configs/nope.py" in lines[0]
  installed = pathlib.Path(satsynth_jax.configs.__path__[0]) / "nope.py"
  assert str(tmp_path / "configs" / "nope.py") in lines[0] and str(installed) in lines[0]


def test_the_only_top_level_package_is_satsynth_jax(tmp_path):
  assert DIST.read_text("top_level.txt").split() == ["satsynth_jax"]
  probe = ("import importlib.util, satsynth_jax.configs.demo as d; "
           "print(importlib.util.find_spec('configs'), d.get_config('cpu').data.format)")
  result = run_elsewhere([sys.executable, "-c", probe], tmp_path)  # no checkout on sys.path there
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["None", "demo"]


def _requirement_name(requirement: str) -> str:
  return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def _imported_top_level_modules() -> set[str]:
  names = set()
  for path in [*(REPO / "satsynth_jax").rglob("*.py"), *(REPO / "configs").glob("*.py")]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        names.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names.add(node.module.split(".")[0])
  return names


def test_every_install_requirement_is_imported_by_the_package():
  """`pip install .` pulls nothing the code never imports (extras hold the optional tools)."""
  providers = importlib.metadata.packages_distributions()  # import name -> distributions
  imported = {_requirement_name(d) for name in _imported_top_level_modules() for d in providers.get(name, [])}
  required = {_requirement_name(r) for r in DIST.requires if "extra ==" not in r}
  assert required and required <= imported, f"required but never imported: {sorted(required - imported)}"


def test_the_tensorboard_and_gcs_extras_bring_their_tools():
  extras = {}
  for requirement in DIST.requires:
    if "extra ==" in requirement:
      extras.setdefault(re.search(r'extra == "([^"]+)"', requirement).group(1), []).append(requirement)
  assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
  assert any(r.startswith("etils[epath-gcs]") for r in extras["gcs"])  # gcsfs, which epath reads gs:// with
  # The TPU VM installer, whose workdirs and records may live on buckets, installs the extra.
  assert "'./satsynth_jax[gcs]'" in (REPO / "launch" / "tpu_vm.sh").read_text()
