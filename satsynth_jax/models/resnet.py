"""ResNet-50 backbone (He et al. 2016) in torchvision's "v1.5" layout, returning C1..C5.

The layout (stride on the 3x3 conv of a bottleneck, symmetric explicit padding, BatchNorm
eps 1e-5 / momentum 0.1 in torch terms) matches torchvision's `resnet50`, so its
ImageNet weights load unchanged from a `.npz` of its state dict (`load_pretrained`;
`tools/convert_torchvision_resnet50.py` writes one from a `.pth`). Module names mirror
torchvision's (`layer2_0/downsample_conv` <-> `layer2.0.downsample.0`), so the name
mapping is mechanical.

BatchNorm has no `axis_name`: the train step is one `jax.jit` over a batch sharded on a
`Mesh`, where the batch mean is taken over the global (logical) batch and XLA inserts
the cross-device reduction, so statistics stay identical on every device.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from satsynth_jax.errors import SatSynthError

RESNET50_STAGES = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x wider
EXPANSION = 4
# torchvision's ImageNet weights expect RGB in [0, 1] standardised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's conv init (He normal over fan-out); the heads use it too.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  pad = kernel // 2  # torch's symmetric padding; "SAME" pads strided convs asymmetrically
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=CONV_INIT, dtype=dtype, name=name)


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
  at strides 4, 8, 16, 32 (256, 512, 1024, 2048 ch)} in the compute `dtype`.
  """

  stage_sizes: Sequence[int] = RESNET50_STAGES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
    if len(self.stage_sizes) != len(STAGE_WIDTHS):
      raise ValueError(f"stage_sizes={tuple(self.stage_sizes)} must have {len(STAGE_WIDTHS)} entries")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    x = _conv(64, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    features = {"C1": x}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS)):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(width, stride, self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
      features[f"C{stage + 2}"] = x
    return features


# ---- torchvision state-dict interop ----

class PretrainedWeightsError(SatSynthError, ValueError):
  """A weights file that does not fit the backbone; the message names the file and key."""


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}
_MODULE_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# Present in torchvision files, unused by a backbone: the classifier and BN step counters.
_IGNORED_TORCH_KEYS = ("fc.weight", "fc.bias")
_IGNORED_TORCH_SUFFIX = ".num_batches_tracked"


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
  return tuple(shape[i] for i in _HWIO_TO_OIHW) if _is_kernel(path) else tuple(shape)


def _flat_variables(params: Mapping, batch_stats: Mapping) -> dict[tuple[str, ...], Any]:
  flat = dict(traverse_util.flatten_dict(params))
  flat.update(traverse_util.flatten_dict(batch_stats))  # leaf names ("mean", "var") never clash
  return flat


def torchvision_state_dict(params: Mapping, batch_stats: Mapping) -> dict[str, np.ndarray]:
  """Backbone variables -> {torchvision key: float32 array in torch layout}."""
  state = {}
  for path, value in _flat_variables(params, batch_stats).items():
    value = np.asarray(value, np.float32)
    state[torchvision_key(path)] = value.transpose(_HWIO_TO_OIHW) if _is_kernel(path) else value
  return state


def export_torchvision_npz(params: Mapping, batch_stats: Mapping, path: str | os.PathLike) -> None:
  """Write backbone variables as a `.npz` with torchvision's keys and layouts."""
  np.savez(path, **torchvision_state_dict(params, batch_stats))


def load_pretrained(params: Mapping, batch_stats: Mapping,
                    path: str | os.PathLike) -> tuple[dict, dict]:
  """Fill the backbone's `params` and `batch_stats` from a torchvision-keyed `.npz`.

  Only the tree structure, shapes and dtypes of the inputs are used (abstract trees from
  `jax.eval_shape` work). Every variable must be in the file with the matching shape, and
  every file key except the classifier (`fc.*`) and `*.num_batches_tracked` must be used,
  so a ResNet-101 file, or a ResNet-50 file against smaller `stage_sizes`, is refused.
  Returns new (params, batch_stats) trees of jax arrays.
  """
  path = os.fspath(path)
  try:
    with np.load(path) as npz:
      arrays = {key: npz[key] for key in npz.files}
  except (OSError, ValueError) as e:
    raise PretrainedWeightsError(f"cannot read pretrained weights {path!r}: {e}") from e

  def fill(tree: Mapping) -> dict:
    filled = {}
    for var_path, target in traverse_util.flatten_dict(tree).items():
      key = torchvision_key(var_path)
      if key not in arrays:
        raise PretrainedWeightsError(f"{path}: missing key {key!r} (backbone variable {'/'.join(var_path)})")
      value = arrays[key]
      expected = _torch_shape(var_path, target.shape)
      if value.shape != expected:
        raise PretrainedWeightsError(
            f"{path}: key {key!r} has shape {value.shape}, the backbone needs {expected}")
      if _is_kernel(var_path):
        value = value.transpose(_OIHW_TO_HWIO)
      filled[var_path] = jnp.asarray(value, dtype=target.dtype)
    return traverse_util.unflatten_dict(filled)

  new_params, new_stats = fill(params), fill(batch_stats)
  used = {torchvision_key(p) for p in _flat_variables(params, batch_stats)}
  unexpected = sorted(k for k in arrays if k not in used and k not in _IGNORED_TORCH_KEYS
                      and not k.endswith(_IGNORED_TORCH_SUFFIX))
  if unexpected:
    raise PretrainedWeightsError(
        f"{path}: {len(unexpected)} keys the backbone has no variable for, e.g. {unexpected[:5]} "
        "(does the file's depth match stage_sizes?)")
  return new_params, new_stats

