"""The layout tells jobs from infrastructure and dependencies point down (DESIGN.md): jobs use inference,
training, data, models, maths and infra; inference never reaches training or jobs; no module joins
workdir paths but infra/workdir.py; only main.py reads config_check."""

import ast
import pathlib

import pytest

from satsynth_jax.main import MODES

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "satsynth_jax"
JOBS, TRAIN, INFRA = "satsynth_jax.jobs", "satsynth_jax.train", "satsynth_jax.infra"
INFERENCE = ("generator.py", "segmenter.py")


def _imports(path: pathlib.Path) -> set[str]:
  """Every satsynth_jax module `path` imports, as dotted names (`from a import b` counts a.b and a)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f"{node.module}.{alias.name}" for alias in node.names}
  return {name for name in names if name.startswith("satsynth_jax")}


def _importing(path: pathlib.Path, *prefixes: str) -> set[str]:
  return {name for name in _imports(path) if any(name == p or name.startswith(p + ".") for p in prefixes)}


def test_every_mode_is_one_module_of_jobs():
  assert {target.split(":")[0] for target in MODES.values()} <= {
      f"{JOBS}.{path.stem}" for path in (PACKAGE / "jobs").glob("*.py")}


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_imports_nothing_from_train_or_jobs(module):
  assert not _importing(PACKAGE / module, TRAIN, JOBS)


def test_training_imports_no_job():
  for path in (PACKAGE / "train").glob("*.py"):
    assert not _importing(path, JOBS), path


def test_models_data_and_maths_import_no_jobs_training_or_inference():
  above = (JOBS, TRAIN, "satsynth_jax.generator", "satsynth_jax.segmenter", "satsynth_jax.config_check")
  for folder in ("models", "metrics", "diffusion", "data"):
    for path in (PACKAGE / folder).rglob("*.py"):
      assert not _importing(path, *above), path


def test_infrastructure_imports_no_jobs_training_models_or_inference():
  above = (JOBS, TRAIN, "satsynth_jax.models", "satsynth_jax.generator", "satsynth_jax.segmenter",
           "satsynth_jax.config_check")
  for path in (PACKAGE / "infra").glob("*.py"):
    assert not _importing(path, *above), path


def test_only_main_reads_config_check():
  for path in PACKAGE.rglob("*.py"):
    if path.name not in ("main.py", "config_check.py"):
      assert not _importing(path, "satsynth_jax.config_check"), path


def test_only_the_workdir_module_names_workdir_subfolders():
  # The layout's folder names appear as path components nowhere else in the package.
  for path in PACKAGE.rglob("*.py"):
    if path.relative_to(PACKAGE) == pathlib.Path("infra", "workdir.py"):
      continue
    lines = path.read_text().splitlines()
    for folder in ("data", "checkpoints", "synthetic", "metrics", "report", "samples", "export"):
      joins = [line for line in lines if f'/ "{folder}"' in line or f'"{folder}/" +' in line
               or ("join(" in line and f'"{folder}"' in line)]
      assert not joins, (path, joins)
