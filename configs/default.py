"""Shared defaults. Dataset configs import this and override `data` fields only.

Values the paper fixes are marked (paper); the rest are our documented defaults for
what it leaves open (../shared/PAPER.md, "What the paper leaves open").
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)

  # ---- data: the only section dataset configs change ----
  c.data = d = ml_collections.ConfigDict()
  d.format = "folder"  # converter: isaid | loveda | openearthmap | folder | demo
  d.source_dir = ""  # the dataset's download folder (set on the command line)
  d.num_classes = 2
  d.class_names = ("background", "foreground")
  d.palette = ((0, 0, 0), (255, 255, 255))  # RGB per class, for previews and RGB masks
  d.ignore_index = 255  # mask value for no-data pixels
  d.mask_format = "index"  # folder format: index masks, or rgb masks coded with `palette`
  d.label_offset = 0  # added to raw mask values (LoveDA/OEM store classes as 1..K)
  d.ignore_raw_values = ()  # raw mask values that mean no-data
  d.patch_size = 256  # prepare tiles scenes into non-overlapping patches of this size
  d.patch_stride = 0  # 0: equal to patch_size
  d.val_fraction = 0.1  # for sources without an official val split
  d.examples_per_shard = 256
  d.image_size = 128  # model resolution (paper: 128); patches are resized to it
  d.resize = "resize"  # resize | crop: how patches reach image_size
  d.augment = True  # flips and rot90, identical on image and mask
  d.label_encoding = "bits"  # bits (paper) | onehot (ablation)
  d.ignore_fill_class = 0  # no-data pixels become this class in diffusion inputs
  d.read_threads = 4

  # ---- G: the joint image+mask DDPM U-Net (Ho et al. 2020 layout for 128px) ----
  c.model = m = ml_collections.ConfigDict()
  m.ch = 128
  m.ch_mult = (1, 1, 2, 3, 4)
  m.num_res_blocks = 2
  m.attn_resolutions = (16,)
  m.dropout = 0.0

  c.diffusion = f = ml_collections.ConfigDict()
  f.timesteps = 1000  # (paper)
  f.beta_start = 1e-4  # (paper) linear schedule
  f.beta_end = 2e-2  # (paper)
  f.prediction = "eps"  # eps (paper) | x0 (ablation)
  f.joint_labels = True  # False: Table 1's image-only DDPM baseline (same U-Net, no label channels)

  # ---- training G (DDPM defaults) ----
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 64  # global, split over all devices
  t.num_steps = 200_000
  t.optimizer = "adam"
  t.lr = 2e-4
  t.schedule = "constant"  # after warmup
  t.weight_decay = 0.0
  t.warmup_steps = 5000
  t.grad_clip = 1.0
  t.ema_decay = 0.9999
  t.log_every = 100
  t.checkpoint_every = 5000
  t.keep_checkpoints = 3
  t.sample_every = 10_000  # PNG grid of EMA samples; 0 disables
  t.num_grid_samples = 16
  t.grid_sampler_steps = 50  # DDIM steps for the periodic grid (cheap preview)

  # ---- sampling the synthetic set D' ----
  c.sample = s = ml_collections.ConfigDict()
  s.per_real = 3  # R: |D'| = R * |D| (paper's best for iSAID)
  s.sampler = "ddpm"  # ddpm (ancestral, T steps) | ddim
  s.ddim_steps = 50
  s.ddim_eta = 0.0
  s.batch_size = 64  # global, split over all devices
  s.checkpoint_step = -1  # -1: latest checkpoint of G
  s.examples_per_shard = 256
  s.super_resolve = False  # cascade: G's pairs through G_SR (train_sr) to sr.image_size
  s.sr_checkpoint_step = -1  # -1: latest checkpoint of G_SR

  # ---- --mode=pipeline ----
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.image_only_baseline = False  # also train/sample/score Table 1's image-only DDPM

  # ---- the segmenter trained on D (R=0) or D u D' (paper: FPN with a ResNet-50) ----
  d.synthetic_ratio = 0  # R used by the segmenter: R x |D| synthetic pairs join training; 0 = real only
  d.synthetic_dir = ""  # default: <workdir>/synthetic
  d.synthetic_fraction = 0.5  # share of each batch that is synthetic when R > 0 (paper: balanced)
  c.segmentation = g = ml_collections.ConfigDict()
  g.model = "fpn"  # fpn | unet (the U-Net head also serves as the FID metric encoder)
  g.backbone_stages = (3, 4, 6, 3)  # ResNet-50
  g.pretrained_path = ""  # optional .npz of torchvision ResNet-50 weights (tools/convert_torchvision_resnet50.py)
  g.train = st = ml_collections.ConfigDict()
  st.batch_size = 16
  st.num_steps = 20_000
  st.optimizer = "adamw"
  st.lr = 1e-4
  st.schedule = "poly"
  st.poly_power = 0.9
  st.weight_decay = 1e-2
  st.warmup_steps = 500
  st.grad_clip = 0.0
  st.ema_decay = 0.0
  st.log_every = 50
  st.checkpoint_every = 1000
  st.keep_checkpoints = 2
  st.sample_every = 0
  g.eval_batch_size = 16

  # ---- G_SR: super-resolution DDPM, data.image_size -> sr.image_size, conditioned on the
  # upsampled low-resolution pair; its noise schedule is config.diffusion's ----
  c.sr = r = ml_collections.ConfigDict()
  r.image_size = 256  # (paper) 128 -> 256; a multiple of data.image_size
  r.model = rm = ml_collections.ConfigDict()  # DDPM 256 px layout
  rm.ch = 128
  rm.ch_mult = (1, 1, 2, 2, 4, 4)
  rm.num_res_blocks = 2
  rm.attn_resolutions = (16,)
  rm.dropout = 0.0
  r.train = ml_collections.ConfigDict(t.to_dict())  # G's training defaults, tuned separately
  return c
