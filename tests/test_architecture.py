"""Dependencies point down (DESIGN.md): inference never reaches training code, no module joins workdir paths."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "satsynth_jax"
INFERENCE = ("generator.py", "segmenter.py", "sample.py", "sample_quality.py", "evaluate.py", "report.py",
             "curate.py", "export.py")


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


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_jobs_import_nothing_from_train(module):
  assert not {name for name in _imports(PACKAGE / module) if name.startswith("satsynth_jax.train")}


def test_models_and_maths_import_no_jobs():
  jobs = {"satsynth_jax.train", "satsynth_jax.sample", "satsynth_jax.experiment", "satsynth_jax.evaluate"}
  for folder in ("models", "metrics", "diffusion"):
    for path in (PACKAGE / folder).glob("*.py"):
      assert not {n for n in _imports(path) if any(n.startswith(j) for j in jobs)}, path


def test_only_the_workdir_module_names_workdir_subfolders():
  # The layout's folder names appear as path components nowhere else in the package.
  for path in PACKAGE.rglob("*.py"):
    if path.name == "workdir.py":
      continue
    lines = path.read_text().splitlines()
    for folder in ("data", "checkpoints", "synthetic", "metrics", "report", "samples", "export"):
      joins = [line for line in lines if f'/ "{folder}"' in line or f'"{folder}/" +' in line
               or ("join(" in line and f'"{folder}"' in line)]
      assert not joins, (path, joins)
