"""Tiny toy-aerial dataset generated on the fly: runs end to end on a CPU, no download.

`--mode=prepare` draws procedural scenes (fields, roads, buildings, water, trees, rare
vehicles) under the workdir and converts them like any real dataset.
"""

from configs import default

CLASSES = (
    ("field", (186, 214, 120)),
    ("road", (128, 128, 128)),
    ("building", (220, 60, 40)),
    ("water", (40, 90, 220)),
    ("tree", (20, 110, 40)),
    ("vehicle", (250, 220, 0)),
)


def get_config():
  c = default.get_config()
  d = c.data
  d.format = "demo"
  d.num_classes = len(CLASSES)
  d.class_names = tuple(name for name, _ in CLASSES)
  d.palette = tuple(rgb for _, rgb in CLASSES)
  d.demo_num_scenes = 24  # train scenes; val gets a quarter as many
  d.demo_scene_size = 256
  d.patch_size = 64
  d.image_size = 32
  d.examples_per_shard = 64
  return c
