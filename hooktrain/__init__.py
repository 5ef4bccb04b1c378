"""hooktrain: an Accelerate-based iteration trainer for semantic segmentation."""

__version__ = "0.1.0"
