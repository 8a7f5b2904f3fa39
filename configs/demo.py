"""Tiny toy-aerial dataset generated on the fly: runs end to end on a CPU, no download.

`--mode=prepare` draws procedural scenes (fields, roads, buildings, water, trees, rare
vehicles) under the workdir and converts them like any real dataset. The `cpu` preset's
budgets are the default here; `configs/demo.py:paper` gives the paper's model sizes.
"""

from satsynth_jax.configs import default

CLASSES = (
    ("field", (186, 214, 120)),
    ("road", (128, 128, 128)),
    ("building", (220, 60, 40)),
    ("water", (40, 90, 220)),
    ("tree", (20, 110, 40)),
    ("vehicle", (250, 220, 0)),
)


def get_config(arg=None):
  c = default.get_config(arg or "cpu")
  d = c.data
  d.format = "demo"
  d.num_classes = len(CLASSES)
  d.class_names = tuple(name for name, _ in CLASSES)
  d.palette = tuple(rgb for _, rgb in CLASSES)
  # Few labels, as the method targets: 12 scenes of 256 px -> 192 training patches.
  d.demo_num_scenes = 12  # train scenes; val gets half as many, test as many (data/sources/demo.py)
  d.demo_scene_size = 256
  d.demo_seed = 0  # draws the scenes (each split its own stream): another value, another demo
  d.patch_size = 64
  d.no_data_code = False  # the toy scenes label every pixel
  d.examples_per_shard = 64
  return c
