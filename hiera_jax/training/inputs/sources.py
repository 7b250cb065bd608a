"""`make_source`: the dataset a config names, read by grain (random access, `data.py` sources) or
by tf.data (`tfdata.py`). It sits above both backends, so neither imports the other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hiera_jax.training.inputs import tfdata
from hiera_jax.training.inputs.data import (
    DigitsSource,
    FolderSource,
    MovingDigitsSource,
    TfdsSource,
)


def make_source(data_config: Any, split: str, input_size: Sequence[int], train_source=None):
    """The split `data_config` names, read by grain (random access) or tf.data (`tfdata.py`).

    data.backend: 'grain' reads digits, moving digits, ArrayRecord TFDS datasets and class
    folders without TensorFlow; 'tf' reads TFDS datasets in any prepared format (TFRecord) and
    class folders through `tfds.folder_dataset.ImageFolder`; 'auto' takes grain unless a TFDS
    dataset is prepared only as TFRecord.
    """
    kind, backend = data_config.source, data_config.backend
    if backend not in ("auto", "grain", "tf"):
        raise ValueError(f"data.backend must be auto, grain or tf, got {backend!r}")
    if kind in ("digits", "moving_digits") and backend == "tf":
        raise ValueError(f"data.source={kind!r} is generated in memory: use data.backend='grain'")
    if kind == "digits":
        return DigitsSource(split)
    if kind == "moving_digits":
        if len(input_size) != 3:
            raise ValueError("moving_digits needs a video model: input_size (T, H, W)")
        return MovingDigitsSource(split, input_size[0], input_size[1:])
    if kind == "tfds":
        if backend == "tf":
            return tfdata.TfDataSource(data_config, split)
        try:
            return TfdsSource(
                data_config.name,
                data_config.data_dir,
                split,
                data_config.image_key,
                data_config.label_key,
            )
        except FileNotFoundError:
            if backend == "auto" and tfdata.prepared_as_tfrecord(
                data_config.name, data_config.data_dir
            ):
                return tfdata.TfDataSource(data_config, split)
            raise
    if kind == "folder":
        if backend == "tf":
            return tfdata.TfDataSource(data_config, split)
        classes = getattr(train_source, "classes", None)
        return FolderSource(
            data_config.data_dir, split, channels=len(data_config.mean), classes=classes
        )
    raise ValueError(f"data.source must be digits, moving_digits, tfds or folder, got {kind!r}")


def class_names(source: Any) -> tuple[str, ...] | None:
    """The names of a source's classes in label order (the digits, TFDS label names, class
    folders), or None where it has none for each of its classes."""
    names = getattr(source, "class_names", None) or getattr(source, "classes", None)
    if not names or len(names) != getattr(source, "num_classes", -1):
        return None
    return tuple(str(n) for n in names)
