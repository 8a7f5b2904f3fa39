"""satsynth_jax: joint image-mask diffusion for aerial segmentation (SatSynth, CVPR 2024) in JAX."""
from setuptools import find_packages, setup

setup(
    name="satsynth_jax",
    version="0.1.0",
    description="SatSynth in JAX/Flax: synthesise image-mask pairs with diffusion to train aerial segmenters.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The pinned jax, flax, grain, orbax and scikit-image releases need Python 3.11.
    python_requires=">=3.11",
    # configs/ ships too, so config files can `from configs import default` from any directory.
    packages=find_packages(include=["satsynth_jax", "satsynth_jax.*", "configs"]),
    entry_points={"console_scripts": ["satsynth = satsynth_jax.main:run"]},
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "scikit-image>=0.24,<0.27",
        "absl-py>=2,<3",
        "protobuf>=4.25,<8",
        "crc32c>=2.4,<3",
        "safetensors>=0.4,<1",  # torchvision ResNet-50 weights without torch
        "tifffile>=2024.1",
        "tqdm>=4.66,<5",
        "etils[epath]>=1.5",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "scipy>=1.11"],
        # TensorFlow and TFDS read our sets in the interop tests; nothing at run time imports them
        # (the TFDS metadata beside each set is written as plain JSON).
        "tf": ["tensorflow-cpu>=2.20,<3", "tensorflow-datasets>=4.9,<5"],
        # Benchmark peers only (benchmarks/): never imported by the package.
        "bench": ["torch>=2.1,<3", "diffusers>=0.27,<1", "segmentation-models-pytorch>=0.3.3,<1"],
    },
)
