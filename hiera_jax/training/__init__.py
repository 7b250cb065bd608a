"""Training: MAE pretraining and supervised finetuning of Hiera, jit-sharded over a device mesh.

Split by concept: `sharding` (mesh, parameter and batch shardings), `optim` (AdamW, schedules,
weight-decay mask, layer-wise lr decay), `data` (sources, augmentations, deterministic batches),
`checkpoint` (orbax manager, resume, preemption), `metrics` (progress bar, JSON lines,
TensorBoard), `visualize` (MAE reconstruction grids), `loop` (`train_and_evaluate`).
"""

from hiera_jax.training.config import base_config
from hiera_jax.training.loop import train_and_evaluate

__all__ = ["base_config", "train_and_evaluate"]
