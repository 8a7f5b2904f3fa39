"""SatSynth in JAX: joint image-mask diffusion to augment aerial segmentation datasets."""

__version__ = "0.1.0"
