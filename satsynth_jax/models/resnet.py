"""ResNet-50 backbone (He et al. 2016) in torchvision's "v1.5" layout, returning C1..C5.

The layout (stride on the 3x3 conv of a bottleneck, symmetric explicit padding, BatchNorm
eps 1e-5 / momentum 0.1 in torch terms) matches torchvision's `resnet50`, so its
ImageNet weights load unchanged from a `.safetensors` of its state dict (`load_pretrained`),
e.g. timm's `resnet50.tv_in1k` `model.safetensors`, read with safetensors' NumPy API so
torch is never needed (`tools/convert_torchvision_resnet50.py` writes one from a `.pth`).
Module names mirror torchvision's (`layer2_0/downsample_conv` <-> `layer2.0.downsample.0`),
so the name mapping is mechanical.

BatchNorm has no `axis_name`: the train step is one `jax.jit` over a batch sharded on a
`Mesh`, where the batch mean is taken over the global (logical) batch and XLA inserts
the cross-device reduction, so statistics stay identical on every device.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file

from satsynth_jax.infra.errors import SatSynthError
from satsynth_jax.models import layers

RESNET50_STAGES = (3, 4, 6, 3)
RESNET50_WIDTH = 64  # the stem's channels and stage 1's bottleneck width; stages double it
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths at RESNET50_WIDTH; outputs are 4x wider
EXPANSION = 4
# torchvision's ImageNet weights expect RGB in [0, 1] standardised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's conv init (He normal over fan-out); the heads use it too.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  pad = kernel // 2  # torch's symmetric padding; "SAME" pads strided convs asymmetrically
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=CONV_INIT, dtype=dtype, name=name,
                 conv_general_dilated=layers.conv_general_dilated)


def batch_norm(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
  # Statistics and params stay float32 (param_dtype); only the output is in `dtype`.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carries the stride), 1x1 expand; projection shortcut when shapes change."""

  width: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(batch_norm, train, dtype=self.dtype)
    out_features = self.width * EXPANSION
    y = nn.relu(norm(name="bn1")(conv(self.width, 1, 1, "conv1")(x)))
    y = nn.relu(norm(name="bn2")(conv(self.width, 3, self.stride, "conv2")(y)))
    y = norm(name="bn3")(conv(out_features, 1, 1, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = norm(name="downsample_bn")(conv(out_features, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Bottleneck ResNet; (3, 4, 6, 3) is ResNet-50, smaller `stage_sizes` give test-sized nets.

  Takes RGB images [B, H, W, 3] in [0, 1] (standardised inside, as the ImageNet weights
  expect) and returns {"C1": stem output at stride 2 (64 ch), "C2".."C5": stage outputs
  at strides 4, 8, 16, 32 (256, 512, 1024, 2048 ch)} in the compute `dtype`. `base_width`
  scales every width (64 is ResNet-50's, the only one its ImageNet weights fit; 16 gives a
  CPU-sized net for toy data).
  """

  stage_sizes: Sequence[int] = RESNET50_STAGES
  dtype: Any = jnp.float32
  base_width: int = RESNET50_WIDTH

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
    if len(self.stage_sizes) != len(STAGE_WIDTHS):
      raise ValueError(f"stage_sizes={tuple(self.stage_sizes)} must have {len(STAGE_WIDTHS)} entries")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    x = _conv(self.base_width, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    features = {"C1": x}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS)):
      width = width * self.base_width // RESNET50_WIDTH
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(width, stride, self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
      features[f"C{stage + 2}"] = x
    return features


# ---- torchvision state-dict interop ----

def metric_features(features: Mapping[str, jax.Array], spatial_level: str = "C3",
                    spatial_channels: int = 7) -> dict[str, jax.Array]:
  """The sample metrics' float32 features of a ResNet's outputs, as the paper's metric encoder gives them.

  "pooled": C5 averaged over space [B, 2048] (FID); "spatial": the first `spatial_channels` channels of
  `spatial_level`, flattened [B, h * w * spatial_channels] (sFID). sFID (Nash et al. 2021) takes the first
  7 channels of an Inception map on a 17x17 grid; C3 (stride 8) gives a 16x16 grid at 128 px, the closest
  analogue.
  """
  spatial = features[spatial_level][..., :spatial_channels].astype(jnp.float32)
  return {"pooled": jnp.mean(features["C5"].astype(jnp.float32), axis=(1, 2)),
          "spatial": spatial.reshape(spatial.shape[0], -1)}


class PretrainedWeightsError(SatSynthError, ValueError):
  """A weights file that does not fit the backbone; the message names the file and key."""


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}
_MODULE_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# Present in torchvision files, unused by a backbone: the classifier and BN step counters.
_IGNORED_TORCH_KEYS = ("fc.weight", "fc.bias")
_IGNORED_TORCH_SUFFIX = ".num_batches_tracked"
_TORCH_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")
_FLAX_BLOCK = re.compile(r"layer([1-4])_(\d+)")


def torchvision_key(path: Sequence[str]) -> str:
  """Our variable path, e.g. ("layer1_0", "downsample_bn", "mean") -> "layer1.0.downsample.1.running_mean"."""
  *modules, leaf = path
  parts = [_MODULE_TO_TORCH.get(m, m.replace("_", ".")) for m in modules]
  return ".".join([*parts, _LEAF_TO_TORCH[leaf]])


_HWIO_TO_OIHW = (3, 2, 0, 1)
_OIHW_TO_HWIO = (2, 3, 1, 0)


def _is_kernel(path: Sequence[str]) -> bool:
  return path[-1] == "kernel"


def _torch_shape(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
  """The torch layout of one of our variables: conv kernels HWIO -> OIHW, vectors as they are."""
  return tuple(shape[i] for i in _HWIO_TO_OIHW) if _is_kernel(path) else tuple(shape)


def torchvision_state_dict(params: Mapping, batch_stats: Mapping) -> dict[str, np.ndarray]:
  """Backbone variables -> {torchvision key: float32 array in torch layout}, what `load_pretrained` reads.

  `safetensors.numpy.save_file` of it is a file torch's `load_state_dict(strict=False)` and
  `load_pretrained` both take (tests use it to build weight files from a model).
  """
  state = {}
  for tree in (params, batch_stats):
    for path, value in traverse_util.flatten_dict(tree).items():
      value = np.asarray(value, np.float32)
      if _is_kernel(path):
        value = np.ascontiguousarray(value.transpose(_HWIO_TO_OIHW))  # safetensors needs contiguous data
      state[torchvision_key(path)] = value
  return state


def _stage_sizes(params: Mapping) -> tuple[int, ...]:
  """Blocks per stage of a backbone's params tree ("layer3_5" is the 6th block of stage 3)."""
  sizes = [0] * len(RESNET50_STAGES)
  for name in params:
    match = _FLAX_BLOCK.fullmatch(name)
    if match:
      stage = int(match.group(1)) - 1
      sizes[stage] = max(sizes[stage], int(match.group(2)) + 1)
  return tuple(sizes)


def _natural(key: str) -> tuple:
  """Sort key putting layer3.9 before layer3.10, so the key an error names is the first by depth."""
  return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in key.split("."))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise PretrainedWeightsError(f"{path}: no such pretrained weights file")
  try:
    return load_file(path)
  except (SafetensorError, OSError) as e:
    raise PretrainedWeightsError(f"{path}: not a readable .safetensors file ({e})") from e


def load_pretrained(params: Mapping, batch_stats: Mapping,
                    path: str | os.PathLike) -> tuple[dict, dict]:
  """Fill a backbone's `params` and `batch_stats` from a torchvision-keyed `.safetensors` file.

  `params`/`batch_stats` are the trees of the "backbone" submodule; only their structure,
  shapes and dtypes are used, so abstract trees from `jax.eval_shape` work. The file holds
  torchvision's `resnet50` state dict (`conv1.weight`, `bn1.running_mean`,
  `layer1.0.downsample.0.weight`, ...; conv weights OIHW, turned into HWIO here). `fc.*` and
  `*.num_batches_tracked` are ignored. Every backbone variable must be present with its
  shape, a floating dtype and finite values.

  A truncated backbone (every stage no deeper than ResNet-50's (3, 4, 6, 3), e.g. the
  demo's (1, 1, 1, 1)) takes the first blocks of each stage of a ResNet-50 file and
  ignores the rest: the blocks that carry a stage's stride and width change are kept, and
  a residual net degrades gracefully without its later blocks, so this is a usable warm
  start. Any other file key the backbone has no variable for (a ResNet-101's layer3.6 on
  ResNet-50, a key from another model) is refused.

  Returns new (params, batch_stats) trees of jax arrays in the targets' dtypes.
  """
  path = os.fspath(path)
  arrays = _read_safetensors(path)
  trees = {"params": traverse_util.flatten_dict(params),
           "batch_stats": traverse_util.flatten_dict(batch_stats)}
  keys = {(tree, var_path): torchvision_key(var_path) for tree, flat in trees.items() for var_path in flat}

  missing = sorted((key for key in keys.values() if key not in arrays), key=_natural)
  if missing:
    hint = ""
    if len(missing) == len(keys):
      example = next((k for k in sorted(arrays) if not k.endswith(_IGNORED_TORCH_SUFFIX)), None)
      hint = f"; the file has none of torchvision's ResNet names, its first key is {example!r}"
    raise PretrainedWeightsError(
        f"{path}: missing key {missing[0]!r} ({len(missing)} of the backbone's {len(keys)} tensors "
        f"are missing{hint})")

  stage_sizes = _stage_sizes(params)
  truncated = all(n <= full for n, full in zip(stage_sizes, RESNET50_STAGES))

  def ignorable(key: str) -> bool:
    if key in _IGNORED_TORCH_KEYS or key.endswith(_IGNORED_TORCH_SUFFIX):
      return True
    match = _TORCH_BLOCK.match(key)
    if not truncated or not match:
      return False
    stage, block = int(match.group(1)) - 1, int(match.group(2))
    return stage_sizes[stage] <= block < RESNET50_STAGES[stage]

  used = set(keys.values())
  unexpected = sorted((key for key in arrays if key not in used and not ignorable(key)), key=_natural)
  if unexpected:
    raise PretrainedWeightsError(
        f"{path}: key {unexpected[0]!r} has no variable in the backbone of stage_sizes={stage_sizes} "
        f"(unused keys: {len(unexpected)}; is the file a ResNet-50?)")

  filled = {tree: {} for tree in trees}
  for (tree, var_path), key in keys.items():
    target, value = trees[tree][var_path], arrays[key]
    expected = _torch_shape(var_path, target.shape)
    if value.shape != expected:
      raise PretrainedWeightsError(
          f"{path}: key {key!r} has shape {value.shape}, the backbone needs {expected}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise PretrainedWeightsError(f"{path}: key {key!r} has dtype {value.dtype}, not a float")
    value = np.asarray(value, np.dtype(target.dtype))
    if not np.isfinite(value).all():
      raise PretrainedWeightsError(f"{path}: key {key!r} has non-finite values")
    if _is_kernel(var_path):
      value = value.transpose(_OIHW_TO_HWIO)
    filled[tree][var_path] = jnp.asarray(value)
  return (traverse_util.unflatten_dict(filled["params"]),
          traverse_util.unflatten_dict(filled["batch_stats"]))
