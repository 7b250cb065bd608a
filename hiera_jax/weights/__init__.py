"""Checkpoints: PyTorch formats, conversion to and from Flax params, the hub, saved directories."""
