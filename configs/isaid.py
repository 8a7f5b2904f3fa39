"""iSAID (Zamir et al. 2019): 15 object classes + background, RGB-coded semantic masks.

Point `--config.data.source_dir` at the folder holding `train/images/` and `val/images/`
(each `<id>.png` beside `<id>_instance_color_RGB.png`, as in the official release).
"""

from satsynth_jax.configs import default

CLASSES = (
    ("background", (0, 0, 0)),
    ("ship", (0, 0, 63)),
    ("storage_tank", (0, 63, 63)),
    ("baseball_diamond", (0, 63, 0)),
    ("tennis_court", (0, 63, 127)),
    ("basketball_court", (0, 63, 191)),
    ("ground_track_field", (0, 63, 255)),
    ("bridge", (0, 127, 63)),
    ("large_vehicle", (0, 127, 127)),
    ("small_vehicle", (0, 0, 127)),
    ("helicopter", (0, 0, 191)),
    ("swimming_pool", (0, 0, 255)),
    ("roundabout", (0, 191, 127)),
    ("soccer_ball_field", (0, 127, 191)),
    ("plane", (0, 127, 255)),
    ("harbor", (0, 100, 155)),
)


def get_config(arg=None):
  c = default.get_config(arg)
  d = c.data
  d.format = "isaid"
  d.num_classes = len(CLASSES)
  d.class_names = tuple(name for name, _ in CLASSES)
  d.palette = tuple(rgb for _, rgb in CLASSES)
  d.mask_format = "rgb"
  d.no_data_code = False  # every iSAID pixel is labelled (background is a class): the paper's 4 bits
  d.background_index = 0  # "everything else": left out of the "w/o background" means
  d.patch_size = 256
  return c
