"""Segmentors: timm encoders with decode heads, losses and inference."""

from hooktrain.models.config import ModelConfig
from hooktrain.models.segmentor import Segmentor, build_segmentor

__all__ = ["ModelConfig", "Segmentor", "build_segmentor"]
