"""Segmentors: timm encoders with decode heads, losses and inference."""
