"""LoveDA (Wang et al. 2021): 7 land-cover classes; raw mask 0 is no-data.

Point `--config.data.source_dir` at the folder holding `Train/` and `Val/` (each with
`Urban/` and/or `Rural/`, then `images_png/` and `masks_png/`). Raw labels 1..7 become
classes 0..6 and raw 0 becomes the ignore index, as the official loader does.
"""

from satsynth_jax.configs import default

CLASSES = (
    ("background", (255, 255, 255)),
    ("building", (255, 0, 0)),
    ("road", (255, 255, 0)),
    ("water", (0, 0, 255)),
    ("barren", (159, 129, 183)),
    ("forest", (0, 255, 0)),
    ("agriculture", (255, 195, 128)),
)


def get_config(arg=None):
  c = default.get_config(arg)
  d = c.data
  d.format = "loveda"
  d.num_classes = len(CLASSES)
  d.class_names = tuple(name for name, _ in CLASSES)
  d.palette = tuple(rgb for _, rgb in CLASSES)
  d.label_offset = -1
  d.ignore_raw_values = (0,)
  d.patch_size = 256  # paper: non-overlapping 256px patches of the 1024px tiles
  if c.preset == "cpu":  # a few tiles without the official Val split: hold out whole tiles, three
    d.test_fraction = 0.3  # of ten for test so that one tile does not make the mean
    d.val_fraction = 0.2
  return c
