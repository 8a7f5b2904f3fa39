"""Sampling plans for a class-presence conditioned G: which classes each synthetic pair asks for.

A plan turns the real train split's presence vectors (labels.presence of each pair, as G saw
it: at data.image_size; jobs/sample.py reads them) into one request per synthetic pair, in the
order the set is written:

  none   no request: G samples unconditionally (the paper's D').
  real   row j asks for the classes of real pair j mod |D|: every pair R times, so the first
         R x |D| rows (what an arm with ratio R reads) follow the real distribution exactly.
  rare   rows drawn with replacement from the real vectors, pair i with probability
         proportional to sum over its classes c of f_c^(-1/2) (f_c: class c's pixel share in
         the train manifest), so pairs holding rare classes are asked for more often. Only
         train statistics are read.
  sample.require_classes  on top of real or rare: every row also asks for these classes.

The requests of a set are saved beside it (`requested_presence.npy`), so its presence
accuracy (metrics/synthetic.py) can be measured against what was asked.
"""

from __future__ import annotations

import numpy as np

PLANS = ("none", "real", "rare")
REQUESTS_FILE = "requested_presence.npy"
_RARE_STREAM = 0x9A5E  # seed stream of the "rare" draw


def rare_probabilities(vectors: np.ndarray, class_pixels) -> np.ndarray:
  """float64 [N]: each pair's share of the "rare" draw, proportional to sum_c present f_c^(-1/2)."""
  pixels = np.asarray(class_pixels, np.float64)
  present = pixels > 0
  weights = np.where(present, 1.0 / np.sqrt(np.where(present, pixels / pixels.sum(), 1.0)), 0.0)
  score = np.asarray(vectors, np.float64) @ weights
  if score.sum() <= 0:
    raise ValueError("no train pair holds a class with pixels: nothing to weight")
  return score / score.sum()


def class_indices(class_names, requested) -> list[int]:
  """Indices of the `requested` class names (config_check has refused unknown ones)."""
  names = list(class_names)
  return [names.index(name) for name in requested]


def plan_vectors(plan: str, vectors: np.ndarray, count: int, *, class_pixels, require=(), seed: int) -> np.ndarray | None:
  """uint8 [count, K] requests of plan `plan` (None for "none"); `require`: class indices every row asks for."""
  if plan == "none":
    return None
  vectors = np.asarray(vectors, np.uint8)
  if plan == "real":
    rows = vectors[np.arange(count) % len(vectors)]
  elif plan == "rare":
    rng = np.random.default_rng([seed, _RARE_STREAM])
    rows = vectors[rng.choice(len(vectors), size=count, p=rare_probabilities(vectors, class_pixels))]
  else:
    raise ValueError(f"presence plan {plan!r} is not one of {PLANS}")
  rows = rows.copy()
  rows[:, list(require)] = 1
  return rows
