"""What a person reads: score tables, report pictures, training curves and the experiment's summary.md.

Pure formatting of results other jobs computed (eval JSONs, sample-quality JSONs, metric
logs); no model code. Pictures are PIL images the caller saves with viz.save_png.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from satsynth_jax import resolved
from satsynth_jax.infra import viz, workdir as layout

PREVIEW_TILE = 128  # px per panel in the report; small patches are enlarged by an integer factor


def percent(value) -> str:
  """A score in [0, 1] as a percentage with two decimals; "n/a" for undefined (None or NaN)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return f"{100 * value:.2f}"


def json_safe(value):
  """Undefined scores (NaN) -> None, JSON's null, also inside dicts: the JSON a job writes stays standard."""
  if isinstance(value, dict):
    return {key: json_safe(v) for key, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def _enlarge(picture: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement: shows the true pixels of small patches."""
  return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def report_picture(config, preview: dict[str, np.ndarray], scores: dict[str, float], title: str) -> Image.Image:
  """Rows of image | ground truth | prediction, the class legend, and a per-class IoU bar chart."""
  d = config.data
  factor = max(1, PREVIEW_TILE // preview["image"].shape[1])
  gap = np.full((preview["image"].shape[1] * factor, 4, 3), 255, np.uint8)
  rows = []
  for image, mask, pred in zip(preview["image"], preview["mask"], preview["pred"]):
    image, truth, predicted = (_enlarge(panel, factor) for panel in (
        image, viz.colorize(mask, d.palette, d.ignore_index), viz.colorize(pred, d.palette, d.ignore_index)))
    rows.append(np.concatenate([image, gap, truth, gap, predicted], axis=1))
  grid = viz.image_grid(rows, columns=2, pad=8)
  has_ignore = bool(np.any(preview["mask"] == d.ignore_index))
  examples = viz.stack([grid, viz.legend(d.class_names, d.palette, grid.width, with_ignore=has_ignore)])
  ious = [scores[f"iou/{name}"] for name in d.class_names]
  chart = viz.bar_chart([0.0 if math.isnan(v) else v for v in ious],
                        [f"{name} (absent)" if math.isnan(v) else name for name, v in zip(d.class_names, ious)],
                        f"per-class IoU (mIoU {scores['miou']:.3f})", colors=d.palette, value_label="IoU",
                        value_format=lambda v: f"{v:.3g}", width=max(600, grid.width))
  return viz.titled(viz.stack([viz.titled(examples, "image | ground truth | prediction", size=14), chart]), title)


def score_table(scores: dict[str, float], class_names: Sequence[str]) -> str:
  """Per-class IoU and F1 in percent, then the means (without background too, when scored)."""
  width = max(len(name) for name in [*class_names, "mean w/o background"])
  lines = [f"  {'class':<{width}}  {'IoU %':>7}  {'F1 %':>7}"]
  for name in class_names:
    lines.append(f"  {name:<{width}}  {percent(scores[f'iou/{name}']):>7}  {percent(scores[f'f1/{name}']):>7}")
  lines.append(f"  {'mean':<{width}}  {percent(scores['miou']):>7}  {percent(scores['mf1']):>7}")
  if "miou_no_background" in scores:
    lines.append(f"  {'mean w/o background':<{width}}  {percent(scores['miou_no_background']):>7}  "
                 f"{percent(scores['mf1_no_background']):>7}")
  return "\n".join(lines)


def class_frequency_chart(config, manifests: Mapping[str, dict], title: str) -> Image.Image:
  """Per-class pixel fractions of several record sets (e.g. real vs synthetic), log scale."""
  fractions = {name: np.asarray(m["class_pixels"], np.float64) / max(1, sum(m["class_pixels"]))
               for name, m in manifests.items()}
  return viz.grouped_bar_chart(fractions, list(config.data.class_names), title=title, log=True)


def read_jsonl(path) -> list[dict]:
  """The records of a JSON-lines metrics log (MetricWriter); [] when it does not exist."""
  try:
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  except FileNotFoundError:
    return []


def training_curves(logs: Mapping[str, Sequence[dict]], key: str = "loss", title: str = "") -> Image.Image:
  """One line per run of `key` against step, from MetricWriter's JSON-lines records."""
  series = {name: ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
            for name, rows in logs.items()}
  series = {name: xy for name, xy in series.items() if xy[0]}
  return viz.line_chart(series, title or f"training {key}", x_label="step", y_label=key, log_y=True)


def mean_and_stderr(values: Sequence[float | None]) -> tuple[float, float, int]:
  """(mean, standard error of the mean, n) over the defined values; stderr is NaN for n < 2."""
  defined = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
  n = defined.size
  if n == 0:
    return math.nan, math.nan, 0
  stderr = float(defined.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
  return float(defined.mean()), stderr, n


def mean_pm(values: Sequence[float | None]) -> str:
  """"52.13 ± 0.21" in percent (mean ± standard error over seeds); one value alone has no ±."""
  mean, stderr, n = mean_and_stderr(values)
  if n == 0:
    return "n/a"
  return percent(mean) if n < 2 else f"{percent(mean)} ± {100 * stderr:.2f}"


def format_seconds(seconds: float) -> str:
  """"7m05s", "42s"."""
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def difference(values: Sequence[float | None], baseline: Sequence[float | None]) -> tuple[float, float]:
  """(mean(values) - mean(baseline), its standard error) for independent seeds; NaN if either has < 2."""
  a, b = mean_and_stderr(values), mean_and_stderr(baseline)
  return a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)


def difference_text(values, baseline) -> str:
  """"+1.68 ± 0.48 (3.5 SE)" in percent points; "n/a" without error bars."""
  diff, stderr = difference(values, baseline)
  if math.isnan(diff) or math.isnan(stderr):
    return "n/a"
  ratio = f" ({abs(diff) / stderr:.1f} SE)" if stderr > 0 else ""
  return f"{100 * diff:+.2f} ± {100 * stderr:.2f}{ratio}"


def mean_curve(logs: Sequence[Sequence[dict]], key: str) -> tuple[list[int], list[float]]:
  """Steps logged by every run, and `key`'s mean over the runs at each (a curve over seeds)."""
  per_run = [{r["step"]: r[key] for r in rows if key in r} for rows in logs]
  steps = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
  return steps, [float(np.mean([c[step] for c in per_run])) for step in steps]


def tail_change(steps: Sequence[int], values: Sequence[float], last_steps: int) -> float | None:
  """Change of a curve over its last `last_steps` steps (last point minus the point where that window
  starts); None when the window holds fewer than 2 points."""
  start = steps[-1] - last_steps if steps else 0
  window = [v for s, v in zip(steps, values) if s >= start]
  return window[-1] - window[0] if len(window) >= 2 else None


def under_half(quality: dict) -> list[str]:
  """Classes a synthetic set draws at less than half their share of the real train split's pixels."""
  shares = quality.get("class_frequency")
  if not shares or quality.get("class_tv") is None:
    return []
  return [name for name, real in shares["real"].items() if shares["synthetic"][name] < 0.5 * real]


def _split_heading(split: str, manifest: dict | None) -> str:
  role = {"test": "claims are made here; no setting was ever chosen on it",
          "val": "settings (budgets, generator levers) were chosen here"}[split]
  if manifest is None:
    return f"## {split.capitalize()} split ({role})"
  notes = [n for n in manifest.get("split_notes", []) if n.startswith(f"{split}:")]
  origin = f"; {notes[0][len(split) + 2:]}" if notes else ""
  scenes = manifest["num_scenes"]
  return (f"## {split.capitalize()} split: {manifest['num_examples']} patches from {scenes} "
          f"scene{'' if scenes == 1 else 's'} ({role}{origin})")


def summary_markdown(config, evals: Mapping[str, tuple[int, Sequence[dict | None]]],
                     quality: Mapping[str, dict], stage_seconds: Mapping[str, dict],
                     others: Mapping[str, tuple[int, Sequence[dict]]] | None = None,
                     splits: Mapping[str, dict | None] | None = None, convergence: str = "") -> str:
  """The experiment's summary: per split, each arm's mean ± standard error over seeds and its difference
  to D; convergence of D; sample quality; stage times.

  `evals` maps an arm label to (R, the eval JSON of each of its seeds' runs; None if missing);
  `others` the same for runs this config did not ask for (earlier ablations in the workdir);
  `splits` the manifest of each held-out split (its size and where it came from).
  """
  d, g = config.data, config.segmentation
  names = list(d.class_names)
  background = d.background_index >= 0
  header = ["train on", "R", "seeds", "mIoU", "mIoU vs D", "mF1"] + (["mIoU w/o bg"] if background else [])
  header += [f"IoU {n}" for n in names]
  lines = [
      f"# SatSynth experiment: {d.format}, {g.architecture.upper()} segmenter",
      "",
      f"Generator: {config.diffusion.train.num_steps} steps ({config.diffusion.prediction} prediction, "
      f"{d.label_encoding} labels); {config.sample.per_real} synthetic pair(s) per real pair "
      f"({config.sample.sampler}{', through G_SR to ' + str(resolved.synthetic_size(config)) + ' px' if config.sample.super_resolve else ''}); "
      f"segmenter: {g.train.num_steps} steps at {resolved.segmenter_size(config)}px for every arm, synthetic pairs "
      f"{100 * d.synthetic_fraction:g}% of each batch, backbone "
      f"{'from ImageNet weights (' + g.pretrained_path + ')' if g.pretrained_path else 'trained from scratch'}. "
      "Scores in %: mean ± standard error over seeds (each seed its own initialisation, data order and "
      "augmentation); \"vs D\": the difference to D's mean ± its standard error, and how many standard errors that is.",
  ]

  def split_rows(split):
    return lambda rows: [row["splits"][split]["scores"] for row in rows if row is not None and split in row.get("splits", {})]

  for split in layout.HELD_OUT:
    scores_of = split_rows(split)
    baseline = next(iter(evals.values()), (0, []))[1]
    base = [s.get("miou") for s in scores_of(baseline)]

    def table_row(label, ratio, rows, scores_of=scores_of, base=base):
      scores = scores_of(rows)

      def column(key):
        return mean_pm([s.get(key) for s in scores])

      cells = [label, str(ratio), str(len(scores)), column("miou"),
               "" if ratio == 0 else difference_text([s.get("miou") for s in scores], base), column("mf1")]
      cells += [column("miou_no_background")] if background else []
      cells += [column(f"iou/{n}") for n in names]
      return "| " + " | ".join(cells) + " |"

    lines += ["", _split_heading(split, (splits or {}).get(split)), "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [table_row(label, ratio, rows) for label, (ratio, rows) in evals.items()]
    if others:
      lines += ["", "Other segmenter runs in this workdir (earlier ablations, by run name):", "",
                "| " + " | ".join(["run"] + header[1:]) + " |", "|" + "---|" * len(header)]
      lines += [table_row(f"`{group}`", ratio, rows) for group, (ratio, rows) in others.items()]
  if convergence:
    lines += ["", "## Convergence", "", convergence]
  if quality:
    lines += ["", "## Synthetic sets", "",
              "Features and predictions of the encoder (last column: its run, step and weights), a segmenter "
              "trained on the real train split only (sample_quality.encoder; compare FID, sFID, IS and label "
              "fidelity only under the same encoder id); class TV: total variation between the set's and "
              "the real train split's class pixel shares (0: the same shares); under half: classes the set draws "
              "at less than half their real share; presence accuracy: the fraction of pairs asked for a class "
              "whose mask holds it (conditioned sets).", "",
              "| synthetic set | FID | sFID | IS | label fidelity mIoU (%) | class TV | under half | presence accuracy | "
              "encoder |", "|---|---|---|---|---|---|---|---|---|"]
    for label, q in quality.items():
      accuracy = q.get("presence_accuracy") or {}
      shown = ", ".join(f"{name} {100 * v:.0f}%" for name, v in accuracy.items() if v is not None) or "-"
      tv = q.get("class_tv")
      lines.append(f"| {label} | {q['fid']:.3f} | {q['sfid']:.3f} | {q['is']['mean']:.3f} | "
                   f"{percent(q['label_fidelity_miou'])} | {'-' if tv is None else f'{tv:.3f}'} | "
                   f"{', '.join(under_half(q)) or ('-' if tv is None else 'none')} | {shown} | "
                   f"`{q['metric_encoder']}` |")
  if stage_seconds:
    total = sum(t["seconds"] for t in stage_seconds.values())
    compiling = sum(t["compile_seconds"] for t in stage_seconds.values())
    lines += ["", f"Stage times (wall clock of each stage's last run, of which compiling; {format_seconds(total)} "
              f"in all, {format_seconds(compiling)} compiling): "
              + ", ".join(f"{name} {format_seconds(t['seconds'])} ({format_seconds(t['compile_seconds'])})"
                          for name, t in stage_seconds.items()) + "."]
  lines += ["", "Pictures: `report/val_curves.png` (every arm's val mIoU while training), `report/eval_*.png` "
            "(test predictions), `samples/synthetic_grid.png`, `report/class_frequency_*.png`, "
            "`report/sample_quality_*.png`, `report/prepare_*.png`.", ""]
  return "\n".join(lines)
