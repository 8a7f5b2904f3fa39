"""Convert a torchvision ResNet-50 state dict (.pth) into the .safetensors `resnet.load_pretrained` reads.

  python tools/weights/convert_torchvision_resnet50.py --input resnet50.pth --output resnet50.safetensors

For a `.pth` of your own (a fine-tuned or self-supervised torchvision ResNet-50); for
torchvision's ImageNet weights, timm's `resnet50.tv_in1k` (V1) or `resnet50.tv2_in1k` (V2)
`model.safetensors` already has torchvision's names and needs no conversion. Reads a local
file only. torch is needed by this script alone, imported only when reading the .pth; the
package never imports it. The output is checked against a ResNet-50 backbone before it is
moved into place, so a file that exists is loadable.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from satsynth_jax.models import resnet


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth holding a plain state dict -> {key: contiguous float32 array}, BN step counters dropped."""
  import torch  # pylint: disable=import-outside-toplevel

  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
  # safetensors needs contiguous arrays; a .pth may hold strided views.
  return {key: np.ascontiguousarray(value.detach().float().numpy()) for key, value in state.items()
          if not key.endswith(".num_batches_tracked")}


def write_checked_safetensors(arrays: Mapping[str, np.ndarray], output: str,
                              stage_sizes: tuple[int, ...] = resnet.RESNET50_STAGES) -> None:
  """Write `arrays` to `output` atomically after `load_pretrained` accepted them for `stage_sizes`."""
  temporary = f"{output}.tmp"
  save_file(dict(arrays), temporary)
  try:
    with open(temporary, "rb") as f:
      os.fsync(f.fileno())
    init = functools.partial(resnet.ResNet(stage_sizes).init, train=False)
    abstract = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    resnet.load_pretrained(abstract["params"], abstract["batch_stats"], temporary)
  except Exception:
    os.remove(temporary)
    raise
  os.replace(temporary, output)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--input", required=True, help="torchvision resnet50 state dict (.pth)")
  parser.add_argument("--output", required=True, help="destination .safetensors")
  args = parser.parse_args()
  arrays = read_torch_state_dict(args.input)
  write_checked_safetensors(arrays, args.output)
  size_mb = sum(a.nbytes for a in arrays.values()) / 2**20
  print(f"wrote {len(arrays)} arrays ({size_mb:.1f} MiB) to {args.output}; they load into ResNet-50")


if __name__ == "__main__":
  main()
