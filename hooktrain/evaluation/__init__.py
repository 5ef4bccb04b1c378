"""Evaluation: per-image confusion counts and mmseg-exact metrics, the per-class table, the
confusion matrix's files.
"""
