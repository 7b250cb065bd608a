"""Training: MAE pretraining and supervised finetuning of Hiera, jit-sharded over a device mesh.

Split by concept: `setup` (model, optimizer, shardings, the train step), `steps` (pure step
functions), `sharding` (mesh, parameter and batch shardings), `optim` (AdamW, schedules,
weight-decay mask, layer-wise lr decay), `inputs` (sources, augmentations, the host and tf.data
pipelines, batches), `checkpoint` (orbax manager, resume, preemption), `metrics` (progress bar,
JSON lines, TensorBoard), `visualize` (MAE reconstruction grids), `cost` (FLOPs, HBM traffic,
chips and the ahead-of-time fit check for TPU and GPU targets), `loop` (`train_and_evaluate`).

`train_and_evaluate` is imported on first use, so the model-side modules (setup, steps, aot)
load without the input pipeline's dependencies (grain, tensorflow-datasets).
"""

from hiera_jax.training.config import base_config

__all__ = ["base_config", "train_and_evaluate"]


def __getattr__(name: str):
    if name == "train_and_evaluate":
        from hiera_jax.training.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
