"""peer_profile.kind_of on op names torch 2.13's CPU profiler reported for the two peers' train steps."""

import pathlib
import subprocess
import sys

import pytest

from benchmarks.peer_profile import CONV_BWD, kind_of

OBSERVED = {
    # diffusers UNet2DModel (batch 16) and smp FPN('resnet50') (256 px, batch 2), one core.
    "aten::mkldnn_convolution": "conv forward",
    "aten::_slow_conv2d_forward": "conv forward",  # 1x1 stride-1 convs at batch < 16 on one thread
    "aten::thnn_conv2d": "conv forward",
    "aten::conv2d": "conv forward",
    "aten::_convolution": "conv forward",
    "aten::convolution_backward": CONV_BWD,  # both gradients in one op, oneDNN behind a stub
    "aten::_slow_conv2d_backward": CONV_BWD,
    "aten::mm": "dot (attention, dense)",
    "aten::addmm": "dot (attention, dense)",
    "aten::linear": "dot (attention, dense)",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "dot (attention, dense)",
    "aten::native_batch_norm": "reduction (norm statistics, sums)",
    "aten::native_batch_norm_backward": "reduction (norm statistics, sums)",
    "aten::native_group_norm_backward": "reduction (norm statistics, sums)",
    "aten::linalg_vector_norm": "reduction (norm statistics, sums)",
    "aten::_foreach_norm": "reduction (norm statistics, sums)",
    "aten::max_pool2d_with_indices": "reduction (norm statistics, sums)",
    "aten::_log_softmax_backward_data": "reduction (norm statistics, sums)",
    "aten::nll_loss2d_forward": "reduction (norm statistics, sums)",
    "aten::cross_entropy_loss": "reduction (norm statistics, sums)",
    "aten::log_softmax": "reduction (norm statistics, sums)",
    "aten::sum": "reduction (norm statistics, sums)",
    "aten::add_": "elementwise fusion",
    "aten::add": "elementwise fusion",
    "aten::silu": "elementwise fusion",
    "aten::silu_backward": "elementwise fusion",
    "aten::threshold_backward": "elementwise fusion",
    "aten::clamp_min_": "elementwise fusion",
    "aten::addcdiv_": "elementwise fusion",
    "aten::lerp_": "elementwise fusion",
    "aten::_foreach_lerp_": "elementwise fusion",
    "aten::copy_": "copy / transpose",
    "aten::cat": "copy / transpose",
    "aten::clone": "copy / transpose",
    "aten::upsample_bilinear2d_backward": "copy / transpose",
    "aten::view": "other (views, allocation, fill, rng)",
    "aten::transpose": "other (views, allocation, fill, rng)",
    "aten::new_empty_strided": "other (views, allocation, fill, rng)",
    "aten::empty": "other (views, allocation, fill, rng)",
    "aten::fill_": "other (views, allocation, fill, rng)",
    "aten::_nnpack_available": "other (aten)",
    "Optimizer.step#Adam.step": "other (autograd engine, optimizer Python)",
    "autograd::engine::evaluate_function: ConvolutionBackward0": "other (autograd engine, optimizer Python)",
}


@pytest.mark.parametrize("name", sorted(OBSERVED))
def test_kind_of_observed_ops(name):
  assert kind_of(name) == OBSERVED[name]


def test_split_backward_ops_keep_their_side():
  # Backends that dispatch the two gradients separately (oneDNN's older ops, linear's are dots).
  assert kind_of("aten::mkldnn_convolution_backward_weights") == "conv backward-filter"
  assert kind_of("aten::mkldnn_convolution_backward_input") == "conv backward-input"
  assert kind_of("aten::mkldnn_linear_backward_weights") == "dot (attention, dense)"
  assert kind_of("aten::_convert_indices_from_coo_to_csr") == "other (aten)"


def test_module_imports_without_torch():
  # A fresh interpreter: this session may have torch loaded already.
  code = "import sys, benchmarks.peer_profile; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).resolve().parents[1], check=True)
