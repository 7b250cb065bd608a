"""grain input pipelines over random-access sources (the default backend; no TensorFlow).

Training reads an endless, per-epoch-shuffled stream. Global example position `p` maps to
`order[p // R]`, a grain shuffle of the source reseeded every epoch (R = `data.repeated_aug`
consecutive positions read the same example: repeated augmentation), and its augmentation draws
from `rng(seed, p)`. Process `i` of `n` reads the rows `i*L .. (i+1)*L - 1` of every global batch of
`G = n*L` rows, so the global batch at step `s` holds positions `s*G .. s*G + G - 1` on any number
of processes. The grain iterator's state (its next element) is saved in each checkpoint
(`grain.checkpoint`, one JSON file per process) and restored on resume; because every batch is a
pure function of (seed, step), `check_position` can also prove that the restored iterator is where
the restored step says it must be.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from hiera_jax.training.inputs.batching import LocalPositions, check_position, finish_batch
from hiera_jax.training.inputs.data import Transform

__all__ = ["train_dataset", "eval_batches", "example_index", "check_position"]


def _read_options(data_config: Any) -> grain.ReadOptions:
    """`workers` threads, each preparing a whole batch; enough batches ahead to keep them busy."""
    workers = max(1, int(data_config.workers))
    return grain.ReadOptions(
        num_threads=workers, prefetch_buffer_size=max(workers, int(data_config.prefetch))
    )


def train_dataset(
    source,
    transform: Transform,
    *,
    global_batch: int,
    seed: int,
    num_classes: int,
    data_config: Any,
    with_labels: bool,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> grain.IterDataset:
    """This process's training batches from `start_step` on, as a grain IterDataset (iterate it;
    checkpoint its iterator).

    Each batch is a dict with `image` float32 [L, ...], `position` int64 [L] (global example
    positions) and, with labels, `label` float32 [L, num_classes] (one-hot, possibly mixed).
    Batches are prepared by `data.workers` threads, and with `data.worker_processes` > 0 in that
    many processes (for augmentation that holds the GIL); the batches are the same either way.
    """
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} is not divisible by {process_count} processes")
    if len(source) == 0:
        raise ValueError("the training split is empty")
    local_batch = global_batch // process_count
    order = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()

    repeats = max(1, int(data_config.repeated_aug))

    def example(position: int) -> dict[str, Any]:
        rng = np.random.default_rng([seed, position])
        image, label = source.load(int(order[position // repeats]), rng)
        return {"image": transform(image, rng), "label": label, "position": position}

    def finish(batch):
        return finish_batch(
            batch,
            seed=seed,
            num_classes=num_classes,
            data_config=data_config,
            with_labels=with_labels,
        )

    positions = LocalPositions(local_batch, global_batch, process_index * local_batch, start_step)
    # Whole batches are the unit of parallel work: grain's per-element bookkeeping costs more CPU
    # than a small image's augmentation (measured: 2x the CPU per batch on the digits).
    batches = (
        grain.MapDataset.source(positions)
        .map(example)
        .batch(local_batch, drop_remainder=True)
        .map(finish)
        .to_iter_dataset(_read_options(data_config))
    )
    processes = int(data_config.worker_processes)
    if processes > 0:  # each process prepares whole batches; grain interleaves them in order
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads absl flags; train.py parses them
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=processes, per_worker_buffer_size=max(1, int(data_config.prefetch))
            )
        )
    return batches


def example_index(source_len: int, seed: int, position: int) -> int:
    """The source index a training position reads (for tests and debugging)."""
    return int(grain.MapDataset.range(source_len).seed(seed).shuffle().repeat()[position])


def eval_batches(
    source,
    transform: Transform,
    *,
    global_batch: int,
    max_examples: int = 0,
    with_labels: bool,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """The eval split in order, padded to full global batches; `valid` marks real rows."""
    total = len(source) if not max_examples else min(max_examples, len(source))
    local_batch = global_batch // process_count
    num_batches = -(-total // global_batch)
    positions = LocalPositions(local_batch, global_batch, process_index * local_batch)

    def example(index: int) -> dict[str, Any]:
        position = positions[index]
        image, label = source.load(position if position < total else 0, None)  # 0: padding
        out = {
            "image": transform(image, np.random.default_rng([0, position])),
            "valid": position < total,
        }
        if with_labels:
            out["label"] = np.int32(label)
        return out

    options = grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=max(2, workers))
    dataset = grain.MapDataset.range(num_batches * local_batch).map(example).batch(local_batch)
    yield from dataset.to_iter_dataset(options)
