"""Regenerate tests/test_resnet.py's TORCHVISION_DIGEST: torchvision's own forward pass as the reference.

  python tools/weights/torchvision_resnet50_digest.py   # needs torch and torchvision; prints the constant

Builds torchvision's bottleneck ResNet with one block per stage (the test's TINY, the
ResNet-50 layout at test size), fills it with `reference_weights` under the names and
shapes of torchvision's own state dict, runs `reference_input` through the stem and the
four stages, and digests C1..C5. The test loads the same weights, drawn under our
model's torchvision names, into `resnet.ResNet`; equal digests mean the names, layouts,
padding, strides and BatchNorm agree. Only `torchvision_digest` imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

STAGE_SIZES = (1, 1, 1, 1)
INPUT_SHAPE = (1, 37, 45, 3)  # NHWC; odd sizes exercise torch's floor rounding at each stride
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_weights(shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
  """Deterministic float32 weights keyed by torchvision name (torch layout), drawn in sorted key order.

  BN scales and running variances in [0.5, 1.5], conv weights He-normal over fan-in, the rest
  (BN biases and running means) in [-0.2, 0.2]: activations stay O(1) through the net.
  """
  rng = np.random.default_rng(0)
  weights = {}
  for key in sorted(shapes):
    shape = tuple(shapes[key])
    if key.endswith("running_var") or (key.endswith("weight") and len(shape) == 1):
      weights[key] = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 4:
      weights[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    else:
      weights[key] = rng.uniform(-0.2, 0.2, shape)
  return {k: v.astype(np.float32) for k, v in weights.items()}


def reference_input() -> np.ndarray:
  """RGB in [0, 1], NHWC float32 (the model standardises it itself)."""
  return np.random.default_rng(1).uniform(size=INPUT_SHAPE).astype(np.float32)


def digest(features: Mapping[str, np.ndarray]) -> dict[str, tuple[float, ...]]:
  """NHWC level -> (mean of the top-left pixel, mean of the bottom-right pixel, mean, std)."""
  out = {}
  for level, f in features.items():
    f = np.asarray(f, np.float64)
    out[level] = tuple(float(v) for v in (f[0, 0, 0].mean(), f[0, -1, -1].mean(), f.mean(), f.std()))
  return out


def torchvision_digest() -> dict[str, tuple[float, ...]]:
  """The digest of torchvision's ResNet (STAGE_SIZES) with `reference_weights` on `reference_input`."""
  import torch  # pylint: disable=import-outside-toplevel
  from torchvision.models import resnet as tv  # pylint: disable=import-outside-toplevel

  model = tv.ResNet(tv.Bottleneck, list(STAGE_SIZES)).eval()
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")}
  weights = {k: torch.from_numpy(v) for k, v in reference_weights(shapes).items()}
  result = model.load_state_dict(weights, strict=False)
  assert not result.unexpected_keys, result.unexpected_keys
  assert all(k.startswith("fc.") or k.endswith(".num_batches_tracked") for k in result.missing_keys)

  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  x = torch.from_numpy(((reference_input() - mean) / std).transpose(0, 3, 1, 2).copy())
  features = {}
  with torch.no_grad():
    x = model.relu(model.bn1(model.conv1(x)))
    features["C1"] = x
    x = model.maxpool(x)
    for level, layer in zip(("C2", "C3", "C4", "C5"), (model.layer1, model.layer2, model.layer3, model.layer4)):
      x = layer(x)
      features[level] = x
  return digest({k: v.numpy().transpose(0, 2, 3, 1) for k, v in features.items()})


def main() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  print(f"# Produced by torchvision {torchvision.__version__} (torch {torch.__version__}, CPU) "
        "with tools/weights/torchvision_resnet50_digest.py")
  print("TORCHVISION_DIGEST = {")
  for level, values in torchvision_digest().items():
    print(f"    {level!r}: ({', '.join(f'{v:.6g}' for v in values)}),")
  print("}")


if __name__ == "__main__":
  main()
