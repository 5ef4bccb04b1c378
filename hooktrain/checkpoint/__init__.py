"""Checkpoints and the work directory: the file layout, atomic writes, what a checkpoint
holds, which one ``--resume`` continues from, and weights files.
"""
