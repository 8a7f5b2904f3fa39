"""Shared defaults and presets. Dataset configs call `get_config(arg)` and change `data` fields only.

Presets (big_vision style, `--config=configs/loveda.py:cpu`) change budgets, never code paths:
  paper  (the default) the paper's 128 px model and the budgets we chose for what it leaves
         open; meant for accelerators.
  cpu    small models and short schedules that finish on a 2-core CPU: a 32 px U-Net with x0
         prediction (eps drifts in colour at ~1k steps), a ResNet-14 FPN, DDIM sampling.

Values the paper fixes are marked (paper); the rest are our documented defaults for what it
leaves open (../shared/PAPER.md, "What the paper leaves open").
"""

import ml_collections

PRESETS = ("paper", "cpu")


def train_section(**overrides) -> ml_collections.ConfigDict:
  """One model's training settings (G, G_SR, the segmenter, the metric encoder): DDPM-style defaults."""
  t = ml_collections.ConfigDict(dict(
      batch_size=64,  # global, split over all devices
      num_steps=200_000,
      optimizer="adam",  # adam | adamw
      lr=2e-4,
      schedule="constant",  # after warmup: constant | poly | cosine
      poly_power=0.9,
      weight_decay=0.0,
      warmup_steps=5000,
      grad_clip=1.0,  # 0 disables
      ema_decay=0.9999,  # 0 disables EMA
      log_every=100,
      checkpoint_every=5000,
      keep_checkpoints=3,
      sample_every=10_000,  # PNG grid of EMA samples (diffusion models); 0 disables
      num_grid_samples=16,
      grid_sampler_steps=50,  # DDIM steps for the periodic grid (a cheap preview)
  ))
  t.update(overrides)
  return t


def unet_section(**overrides) -> ml_collections.ConfigDict:
  """A DDPM U-Net layout (Ho et al. 2020): channels, multipliers per level, blocks, attention."""
  # scale_shift: ADM's time conditioning (models/unet.py ResBlock); the reference adds it before a
  # GroupNorm, which erases it where a group holds one channel (32 channels in 32 groups).
  # edge_padding: the first and last convolutions' padding, zeros (the reference's) | reflect.
  m = ml_collections.ConfigDict(dict(ch=128, ch_mult=(1, 1, 2, 3, 4), num_res_blocks=2, attn_resolutions=(16,),
                                     dropout=0.0, scale_shift=False, edge_padding="zeros"))
  m.update(overrides)
  return m


def get_config(arg=None):
  preset = arg or "paper"
  if preset not in PRESETS:
    raise ValueError(f"unknown config preset {preset!r}; presets: {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)

  # ---- data: the only section dataset configs change ----
  c.data = d = ml_collections.ConfigDict()
  d.format = "folder"  # converter: isaid | loveda | openearthmap | folder | demo
  d.source_dir = ""  # the dataset's download folder (set on the command line)
  d.num_classes = 2
  d.class_names = ("background", "foreground")
  d.palette = ((0, 0, 0), (255, 255, 255))  # RGB per class, for previews and RGB masks
  d.ignore_index = 255  # mask value for no-data pixels (65535 when num_classes > 255)
  d.background_index = -1  # a class that is "everything else" (iSAID: 0), left out of "w/o bg" means; -1: none
  d.mask_format = "index"  # folder format: index masks, or rgb masks coded with `palette`
  d.label_offset = 0  # added to raw mask values (LoveDA/OEM store classes as 1..K)
  d.ignore_raw_values = ()  # raw mask values that mean no-data
  d.max_image_pixels = 0  # refuse larger source images (decompression bombs); 0: Pillow's limit
  d.patch_size = 256  # prepare tiles scenes into non-overlapping patches of this size
  d.patch_stride = 0  # 0: equal to patch_size
  # Split roles (data/splits.py): test is never used to choose anything. A download's labelled
  # test split is test; else its val split is (LoveDA, iSAID and OpenEarthMap withhold test
  # labels); else test_fraction of the train scenes. val is then val_fraction of the remaining
  # train scenes (or the download's val when test came from its test split). Whole scenes,
  # drawn with split_seed.
  d.val_fraction = 0.1
  d.test_fraction = 0.1
  d.split_seed = 0
  d.examples_per_shard = 256
  d.image_size = 128  # model resolution (paper: 128); patches are resized to it
  d.resize = "resize"  # resize | crop: how patches reach image_size
  d.augment = True  # flips and rot90, identical on image and mask
  d.label_encoding = "bits"  # bits (paper) | onehot (ablation)
  # No-data pixels get a code of their own in G's label channels (the spare bit code when
  # K < 2^bits, else one more bit; one more channel for one-hot) and decode back to no-data,
  # so synthetic masks never teach a class the real loss ignores. False: the paper's codec,
  # with no-data filled with ignore_fill_class (for datasets without no-data, e.g. iSAID).
  d.no_data_code = True
  d.ignore_fill_class = 0
  d.max_no_data_fraction = 0.5  # prepare drops train patches with more no-data than this (1.0 keeps all)
  d.read_threads = 4
  # The segmenter's synthetic share: R x |D| synthetic pairs join training (0 = real only),
  # mixed into every batch at synthetic_fraction (paper: balanced, real oversampled).
  d.synthetic_ratio = 0
  d.synthetic_dir = ""  # default: the synthetic set this config's generator samples
  d.synthetic_fraction = 0.5

  # ---- G: the joint image+mask DDPM ----
  c.diffusion = f = ml_collections.ConfigDict()
  f.timesteps = 1000  # (paper)
  f.beta_start = 1e-4  # (paper) linear schedule
  f.beta_end = 2e-2  # (paper)
  f.prediction = "eps"  # eps (paper) | x0 (ablation) | v
  f.joint_labels = True  # False: Table 1's image-only DDPM baseline (same U-Net, no label channels)
  # Beyond the paper (benchmarks/RESULTS.md measures each per CPU-minute):
  f.self_condition = False  # Analog Bits' self-conditioning on the previous x0 estimate
  f.loss_weighting = "uniform"  # uniform (paper) | min_snr (Hang et al. 2023)
  f.min_snr_gamma = 5.0
  # Each pixel's loss weighs its class's train share to the power -class_weight_power (0: the paper,
  # every pixel alike; 0.5: inverse square root), so a generator learns rare classes it would drown.
  f.class_weight_power = 0.0
  # Class-presence conditioning (diffusion/guidance.py): "presence" feeds G which classes each
  # training pair holds, dropped with condition_dropout so one G samples both conditionally
  # (sample.presence plans, classifier-free guidance) and unconditionally.
  f.condition = "none"  # none (paper) | presence
  f.condition_dropout = 0.1
  f.model = unet_section()  # DDPM 128 px layout
  f.train = train_section()

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
  # What a presence-conditioned G is asked for (presence.py): none (unconditional), real (each
  # real train pair's classes, R times), rare (train vectors re-weighted toward rare classes);
  # require_classes adds class names every pair asks for, e.g. ("vehicle",).
  s.presence = "none"
  s.require_classes = ()
  s.guidance = 0.0  # classifier-free guidance scale w (0: plain conditional sampling)

  # ---- G_SR: super-resolution DDPM, data.image_size -> sr.image_size, conditioned on the
  # upsampled low-resolution pair; its noise schedule is config.diffusion's ----
  c.sr = r = ml_collections.ConfigDict()
  r.image_size = 256  # (paper) 128 -> 256; a multiple of data.image_size
  r.model = unet_section(ch_mult=(1, 1, 2, 2, 4, 4))  # DDPM 256 px layout
  r.train = train_section()

  # ---- the segmenter trained on D (R=0) or D u D' (paper: FPN with a ResNet-50) ----
  c.segmentation = g = ml_collections.ConfigDict()
  g.architecture = "fpn"  # fpn | unet (the U-Net head also serves as the FID metric encoder)
  g.image_size = 0  # the segmenter's input size; 0: data.image_size (Table 2: 256, through the G_SR cascade)
  g.resize_synthetic = False  # True: resize synthetic pairs of another size instead of refusing them
  g.backbone_stages = (3, 4, 6, 3)  # ResNet-50
  g.base_width = 64  # ResNet-50's widths (the only ones its ImageNet weights fit); scales FPN and decoder too
  g.pretrained_path = ""  # optional .safetensors of torchvision ResNet-50 weights (README: ImageNet backbone)
  g.train = train_section(batch_size=16, num_steps=20_000, optimizer="adamw", lr=1e-4, schedule="poly",
                          weight_decay=1e-2, warmup_steps=500, grad_clip=0.0, ema_decay=0.0, log_every=50,
                          checkpoint_every=1000, keep_checkpoints=2, sample_every=0)
  g.eval_batch_size = 16
  # Log val mIoU / mF1 every this many steps (0: never): a curve to watch, never a model
  # selection (a run's score is --mode=evaluate's on its last checkpoint). A val pass costs
  # hundreds of train steps at paper sizes, hence every 2000 here and every 100 in `cpu`.
  g.eval_every = 2000

  # ---- --mode=experiment: the paper's comparison as one resumable command ----
  c.experiment = e = ml_collections.ConfigDict()
  e.image_only_baseline = False  # also train/sample/score Table 1's image-only DDPM
  e.seeds = 3  # segmenter runs per arm (seeds seed, seed+1, ...): the summary shows mean ± standard error
  e.ratios = ()  # R of each D u D' arm, each <= sample.per_real (Table 2: (1, 2, 3, 4, 5)); (): (sample.per_real,)
  # The summary calls D converged when its mean val mIoU moved by at most this (0.01: one point)
  # over the last fifth of training; every arm trains on D's schedule, so the comparison only
  # means something then (../shared/PAPER.md).
  e.flat_within = 0.01
  # The arms beside D (real only): raw (D u D', the paper's), curated (D u D'_curated, from the
  # unconditional pool), conditioned (D u D'_conditioned: a presence-conditioned G asked with the
  # experiment.presence plan) and conditioned_curated (curation on top of the conditioned set).
  e.arms = ("raw", "curated")
  e.presence = "real"  # the conditioned arms' sampling plan (sample.presence values but "none")

  # ---- curation: between sampling and segmenter training (jobs/curate.py, --mode=curate) ----
  # A segmenter trained on real data only scores P x R x |D| sampled candidates: pixels whose
  # loss against the generated mask exceeds their class's threshold over the pool become no-data,
  # pairs whose masks the scorer mostly disagrees with are dropped, and R x |D| pairs are chosen
  # from the rest (FreeMask, Yang et al. 2023, adapted).
  c.curation = u = ml_collections.ConfigDict()
  u.enabled = True  # sample draws the pool and the experiment adds the curated arm (False: the paper's D')
  u.pool_factor = 2  # P >= 1: candidates sampled per pair kept
  u.scorer = "real_only"  # real_only (the experiment's R=0 segmenter, seed `seed`) | metric_encoder
  u.pixel_tolerance = 1.0  # class threshold = mean + pixel_tolerance x std of the pool's losses of that class
  u.min_fidelity = 0.5  # drop pairs where the scorer agrees with less than this fraction of labelled pixels
  u.selection = "hard_rare"  # hard_rare (weighted to hard and rare classes of the train split) | uniform

  # ---- --mode=evaluate_samples: FID, sFID, IS and label fidelity of a synthetic set ----
  c.sample_quality = q = ml_collections.ConfigDict()
  # The network whose features and predictions score a set: metric_encoder (the paper's ResNet U-Net,
  # trained by --mode=train_metric_encoder) | real_only (the experiment's R=0 segmenter of seed `seed`,
  # as curation.scorer: nothing more to train). Compare scores only under the same encoder id.
  q.encoder = "metric_encoder"

  # ---- --mode=export: a set as PNG folders (images/, masks/, previews/, classes.json) ----
  c.export = x = ml_collections.ConfigDict()
  x.set = ""  # train | val | a set under <workdir>/synthetic/ | "": the set this config samples

  if preset == "cpu":
    _cpu(c)
  return c


def _cpu(c) -> None:
  """Budgets for a 2-core CPU: 32 px, a small U-Net, short schedules, a ResNet-14 FPN."""
  c.data.image_size = 32
  f = c.diffusion
  # x0 prediction (the paper's ablation) gives coherent pairs within ~1k CPU steps, where
  # eps prediction still drifts in colour.
  f.prediction = "x0"
  # Reflected edges at G's input and output: with zero padding G drew a frame two pixels inside every
  # image (brightness step between pixel rings 1 and 2: 3.0 at 1200 steps, real patches 1.5; reflected
  # 1.9). A fainter frame remains, strongest under guidance (RESULTS.md, benchmarks/edge_profile.py).
  f.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), edge_padding="reflect")
  # Chosen on the demo's val split at equal CPU time (benchmarks/generator_levers.py, RESULTS.md):
  # a class-presence conditioned G whose loss weighs each class by its train share^-0.5 is the one
  # that draws every class at least at half its real share (vehicles, water) with presence accuracy
  # >= 0.9 under guidance 1 (self-conditioning, v or eps prediction, min-SNR: no better at equal time).
  f.condition = "presence"
  f.class_weight_power = 0.5
  # Batch 16 for 2400 steps, ~6.5 minutes on 2 cores: at 1200 steps synthetic pairs did not help on val
  # (G's loss still falling, blurry buildings); doubling them raised label fidelity 3-4 points and val
  # with it (RESULTS.md, "What the gain needs"). The demo's 15-minute budget holds it (README).
  f.train.update(batch_size=16, num_steps=2400, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=50,
                 checkpoint_every=400, sample_every=1200)
  c.sample.update(per_real=2, sampler="ddim", ddim_steps=20, batch_size=128, examples_per_shard=128, guidance=1.0)
  g = c.segmentation
  # A ResNet-14 at a quarter of ResNet-50's widths: the same code, sized for 32 px toy scenes on a CPU
  # (a 100 ms train step here instead of 2.4 s).
  g.backbone_stages = (1, 1, 1, 1)
  g.base_width = 16
  # 1000 steps at lr 3.2e-2 (poly decay): the best val mIoU of real-only D among the budgets that fit
  # 9 runs in the demo (benchmarks/segmenter_budget.py); every arm trains on this one schedule.
  g.train.update(batch_size=32, num_steps=1000, lr=3.2e-2, warmup_steps=25, log_every=50, checkpoint_every=500)
  g.eval_batch_size = 32
  g.eval_every = 100  # 10 points of every arm's val curve
  # The paper's arm (D u D', unconditional) beside the curated one, chosen on the val splits of three
  # demo draws (RESULTS.md, 2026-12-02 later): D u D'_curated +0.74 mIoU over D on average against raw's
  # +0.40; synthetic_fraction 0.25 (+0.56) and the presence-conditioned arm under guidance 1 (-0.70,
  # worst on every draw) were not kept. The conditioned arm stays an arm to add (experiment.arms).
  c.experiment.arms = ("raw", "curated")
  c.experiment.presence = "real"
  # The sets are scored by D's first segmenter rather than a metric encoder of their own: one network
  # less to train (a minute of the demo) and to compile, and the judge is the one a user deploys.
  c.sample_quality.encoder = "real_only"
  r = c.sr
  r.image_size = 64
  r.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
  r.train.update(batch_size=16, num_steps=800, lr=1e-3, warmup_steps=50, ema_decay=0.99, log_every=50,
                 checkpoint_every=200, sample_every=400)
