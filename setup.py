"""satsynth_jax: joint image-mask diffusion for aerial segmentation (SatSynth, CVPR 2024) in JAX."""
from setuptools import find_packages, setup

setup(
    name="satsynth_jax",
    version="0.1.0",
    description="SatSynth in JAX/Flax: synthesise image-mask pairs with diffusion to train aerial segmenters.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # jax 0.7 (the first with jax.set_mesh is 0.7.1) and flax 0.11 need Python 3.11.
    python_requires=">=3.11",
    # The top-level configs/ folder installs as satsynth_jax.configs (no generic top-level
    # `configs` package), so `--config=configs/X.py` resolves from any folder (main.py).
    packages=find_packages(include=["satsynth_jax", "satsynth_jax.*"]) + ["satsynth_jax.configs"],
    package_dir={"satsynth_jax.configs": "configs"},
    entry_points={"console_scripts": ["satsynth = satsynth_jax.main:run"]},
    # Lower bounds are tested by hand with .ci/lower_bounds (pins in .ci/lower_bounds.txt).
    install_requires=[
        "jax>=0.7.1,<0.11",  # jax.set_mesh
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",  # optax.tree.norm
        "orbax-checkpoint>=0.11.30,<0.13",  # <0.11.30 slices arrays outside jax.set_mesh's mesh on save
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        "pillow>=10.1,<14",  # ImageFont.load_default(size=)
        "scikit-image>=0.24,<0.27",
        "absl-py>=2,<3",
        "protobuf>=5.28.3,<8",  # data/tfrecord.py; grain needs >=5.28.3
        "crc32c>=2.4,<3",  # TFRecord checksums
        "safetensors>=0.4,<1",  # torchvision ResNet-50 weights without torch
        "tifffile>=2024.1.30",  # OpenEarthMap GeoTIFFs
        "tqdm>=4.66,<5",
        "etils[epath]>=1.7",  # records on local disks or buckets; orbax needs mkdir(mode=), new in 1.7
    ],
    extras_require={
        # pytest-xdist: the suite runs its test files on 2 workers (pytest.ini), as compiling is single-threaded.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "scipy>=1.12"],
        "mutation": ["mutmut>=3.8.1,<4"],  # tools/mutation/mutation.sh (fork-server isolation is new in 3.8)
        # `tensorboard --logdir WORKDIR/metrics` shows the event files infra/metric_writer.py writes.
        "tensorboard": ["tensorboard>=2.21"],  # 2.20 still imports pkg_resources, gone from setuptools 82
        # Records read from gs:// (records.PairSource, the data pipeline): etils.epath reads buckets via gcsfs.
        "gcs": ["etils[epath-gcs]>=1.7"],
        # TensorFlow and TFDS read our sets in the interop tests; nothing at run time imports them
        # (the TFDS metadata beside each set is written as plain JSON).
        "tf": ["tensorflow-cpu>=2.20,<3", "tensorflow-datasets>=4.9,<5"],
        # Benchmark peers only (benchmarks/): never imported by the package.
        "bench": ["torch>=2.1,<3", "diffusers>=0.27,<1", "segmentation-models-pytorch>=0.3.3,<1"],
    },
)
