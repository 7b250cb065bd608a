"""Pieces both input backends share (grain in `pipeline.py`, tf.data in `tfdata.py`): which
global example positions a process reads, how stacked examples become a step's batch, and the
check that a restored iterator is where the restored step says it must be."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from hiera_jax.training.inputs.data import mix_batch

# An endless stream: grain iterates a MapDataset up to its length.
ENDLESS = sys.maxsize // 4


class LocalPositions:
    """Element i of this process -> global position (random access, endless from `start_step`)."""

    def __init__(self, local_batch: int, global_batch: int, row0: int, start_step: int = 0):
        self.local_batch, self.global_batch, self.row0 = local_batch, global_batch, row0
        self.start_step = start_step

    def __len__(self) -> int:
        return ENDLESS

    def __getitem__(self, index: int) -> int:
        step, row = divmod(int(index), self.local_batch)
        return (self.start_step + step) * self.global_batch + self.row0 + row


def finish_batch(
    batch: dict[str, np.ndarray],
    *,
    seed: int,
    num_classes: int,
    data_config: Any,
    with_labels: bool,
) -> dict[str, np.ndarray]:
    """Stacked examples -> the step's batch: one-hot labels, mixup/cutmix inside the batch.

    The mixing draw depends only on the seed and the batch's first position, so it is the same on
    every backend and after a resume.
    """
    out = {"image": batch["image"].astype(np.float32), "position": batch["position"]}
    if with_labels:
        onehot = np.eye(num_classes, dtype=np.float32)[batch["label"]]
        rng = np.random.default_rng([seed, 2**31, int(batch["position"][0])])
        out["image"], out["label"] = mix_batch(out["image"], onehot, rng, data_config)
    return out


def check_position(batch: dict[str, np.ndarray], step: int, global_batch: int, row0: int) -> None:
    """Raise if a batch is not the one `step` must see (a restored iterator out of step)."""
    expected = step * global_batch + row0
    got = int(batch["position"][0])
    if got != expected:
        raise RuntimeError(
            f"the input pipeline is at example position {got} but step {step} needs {expected}: "
            "the data iterator restored from the checkpoint does not match the training state "
            "(was batch_size changed on resume?). Resume with the original batch_size, or start "
            "a new workdir with init_from pointing at this run's model."
        )
