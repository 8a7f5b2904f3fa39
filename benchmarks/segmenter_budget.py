"""How long the demo's segmenter must train before real-only (D) stops improving on val.

Run from the repository root:

  python -m benchmarks.segmenter_budget --root=/tmp/budget --steps=500,1000,1500 --seeds=3

Each budget trains D (the R = 0 arm) from scratch with `segmentation.train.num_steps` set to it
(the poly schedule decays over the whole budget), `--seeds` seeds each with its own data order,
logging val mIoU every `segmentation.eval_every` steps. The table shows, per budget, D's final
val mIoU (mean ± standard error), the change of its mean val curve over the last fifth of
training (the experiment's convergence test, `experiment.flat_within`) and the wall time per run.
Only val is read: the budget is a setting, and settings are chosen on val. `--set` overrides
other config keys for every run (e.g. `--set=segmentation.train.lr=2e-3`).
"""

from __future__ import annotations

import argparse
import pathlib
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--steps", default="500,1000,1500")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--set", action="append", default=[], help="key=value config override (repeatable)")
  args = parser.parse_args()

  from satsynth_jax.infra import host_devices  # pylint: disable=g-import-not-at-top
  host_devices.configure()  # the CLI's CPU flags, before JAX starts

  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from satsynth_jax import resolved  # pylint: disable=g-import-not-at-top
  from satsynth_jax.configs import demo  # pylint: disable=g-import-not-at-top
  from satsynth_jax.infra import report, workdir as layout  # pylint: disable=g-import-not-at-top
  from satsynth_jax.jobs import evaluate, prepare, train_segmentation  # pylint: disable=g-import-not-at-top

  overrides = common.parse_overrides(args.set)
  root = args.root.absolute()
  base = demo.get_config()
  base.update_from_flattened_dict(overrides)
  prepare.run(base, root / "data_root")
  rows = []
  for steps in (int(s) for s in args.steps.split(",")):
    config = base.copy_and_resolve_references()
    config.segmentation.train.num_steps = steps
    config.segmentation.train.checkpoint_every = steps
    workdir = root / f"steps{steps}"
    (workdir / "data").parent.mkdir(parents=True, exist_ok=True)
    if not (workdir / "data").exists():
      (workdir / "data").symlink_to(root / "data_root" / "data")
    finals, logs, seconds = [], [], []
    for seed in range(args.seeds):
      run = resolved.SegmenterRun.arm(config, 0, seed, None)
      started = time.perf_counter()
      train_segmentation.train_run(config, workdir, run)
      seconds.append(time.perf_counter() - started)
      finals.append(evaluate.evaluate_run(config, workdir, run)["val"]["miou"])
      logs.append(report.read_jsonl(layout.metrics_path(workdir, run.name, ".jsonl")))
    curve = report.mean_curve(logs, "val_miou")
    change = report.tail_change(*curve, max(steps // 5, config.segmentation.eval_every))
    rows.append([steps, report.mean_pm(finals), "n/a" if change is None else f"{100 * change:+.2f}",
                 f"{min(seconds):.0f}"])
    print(common.markdown_table(["steps", "D val mIoU %", "last-fifth change (points)", "s / run"], rows), flush=True)


if __name__ == "__main__":
  main()
