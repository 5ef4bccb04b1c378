"""Weights from other frameworks: MMSegmentation zoo checkpoints, NVlabs' and transformers'
SegFormer, converted to hooktrain's (timm-based) models."""
