"""OpenEarthMap (Xia et al. 2023): 8 land-cover classes; raw mask 0 is "unknown".

Point `--config.data.source_dir` at the unpacked release (e.g. `OpenEarthMap_wo_xBD/`)
holding `<region>/images/*.tif`, `<region>/labels/*.tif` and the split lists
`train.txt` / `val.txt`. Raw labels 1..8 become classes 0..7; 0 becomes the ignore index.
"""

from satsynth_jax.configs import default

CLASSES = (
    ("bareland", (128, 0, 0)),
    ("rangeland", (0, 255, 36)),
    ("developed_space", (148, 148, 148)),
    ("road", (255, 255, 255)),
    ("tree", (34, 97, 38)),
    ("water", (0, 69, 255)),
    ("agriculture_land", (75, 181, 73)),
    ("building", (222, 31, 7)),
)


def get_config(arg=None):
  c = default.get_config(arg)
  d = c.data
  d.format = "openearthmap"
  d.num_classes = len(CLASSES)
  d.class_names = tuple(name for name, _ in CLASSES)
  d.palette = tuple(rgb for _, rgb in CLASSES)
  d.label_offset = -1
  d.ignore_raw_values = (0,)
  d.patch_size = 256  # paper: 256px patches of the 1024px tiles
  return c
