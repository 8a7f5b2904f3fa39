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
  # Few labels, as the method targets: 12 scenes of 256 px -> 192 training patches.
  d.demo_num_scenes = 12  # train scenes; val gets a quarter as many (at least 2)
  d.demo_scene_size = 256
  d.patch_size = 64
  d.image_size = 32
  d.examples_per_shard = 64

  # Small models and short schedules so the whole pipeline runs on 2 CPU cores (~15 min).
  m = c.model
  m.ch = 32
  m.ch_mult = (1, 2, 2)
  m.num_res_blocks = 1
  m.attn_resolutions = (8,)
  # x0 prediction (the paper's ablation) gives coherent pairs within a CPU budget of ~1k
  # steps, where eps prediction still drifts in colour; real configs keep eps.
  c.diffusion.prediction = "x0"
  t = c.train
  t.batch_size = 32
  t.num_steps = 800
  t.lr = 1e-3
  t.warmup_steps = 100
  t.ema_decay = 0.995
  t.log_every = 50
  t.checkpoint_every = 200
  t.sample_every = 400
  s = c.sample
  s.per_real = 2
  s.sampler = "ddim"
  s.ddim_steps = 50
  s.batch_size = 128
  s.examples_per_shard = 128

  g = c.segmentation
  g.backbone_stages = (1, 1, 1, 1)  # a ResNet-14 instead of -50: same code, CPU-sized
  g.train.batch_size = 32
  g.train.num_steps = 400
  g.train.lr = 1e-3
  g.train.warmup_steps = 40
  g.train.log_every = 50
  g.train.checkpoint_every = 200
  g.eval_batch_size = 32

  r = c.sr  # only used by --mode=train_sr / sample.super_resolve on the demo
  r.image_size = 64
  r.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
  r.train.update(batch_size=16, num_steps=800, lr=1e-3, warmup_steps=50, ema_decay=0.99, sample_every=400)
  return c
