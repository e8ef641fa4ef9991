"""moebench: one harness to compress and measure Mixture-of-Experts language models."""

__version__ = "0.1.0"
