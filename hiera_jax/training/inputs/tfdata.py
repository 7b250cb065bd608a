"""tf.data input, the optional backend (`pip install -e '.[tf]'`), for what grain cannot read.

TFDS datasets prepared as TFRecord (ImageNet usually is) have no random access, and
`tfds.folder_dataset.ImageFolder` is built on tf.data; both are streamed here. TensorFlow is
imported only when this backend is chosen (it is about 1.5 GB), and never sees the accelerators.

The stream is deterministic given the seed: files and examples are shuffled with fixed seeds,
images stay encoded until after `skip`, and example positions, augmentation draws and batch
layout are those of the grain backend (`pipeline.py`). The iterator's state is the number of
examples this process consumed; a resumed run skips that many records (read, not decoded) and
sees the batches the uninterrupted run would have.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from hiera_jax.training.inputs.batching import LocalPositions, finish_batch
from hiera_jax.training.inputs.data import Transform


def import_tensorflow():
    """TensorFlow, CPU only, or an error that says how to install it or how to avoid it."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            "this dataset is read through tf.data, which needs TensorFlow: "
            "pip install -e '.[tf]' (tensorflow-cpu, about 1.5 GB). A TFDS dataset can instead "
            "be converted once to ArrayRecord and read without TensorFlow: tfds convert_format "
            "--dataset_version_dir=DATA_DIR/NAME/VERSION --out_file_format=array_record; a class "
            "folder tree is read without TensorFlow by data.backend='grain'."
        ) from err
    tf.config.set_visible_devices([], "GPU")  # leave accelerator memory to JAX
    return tf


def prepared_as_tfrecord(name: str, data_dir: str) -> bool:
    """Whether TFDS dataset `name` is prepared under `data_dir` as TFRecord (checked without TF)."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    base = name.split(":")[0]
    return bool(glob.glob(os.path.join(root, base, "**", "*.tfrecord*"), recursive=True))


class TfDataSource:
    """A split read through tf.data: sizes, classes and channels up front, examples as a stream.

    data.source='tfds': a prepared TFDS dataset (any file format tf.data reads, e.g. TFRecord).
    data.source='folder' with data.backend='tf': `tfds.folder_dataset.ImageFolder(data_dir)`,
    i.e. `data_dir/<split>/<class>/<image>`.
    """

    def __init__(self, data_config: Any, split: str):
        self.tf = import_tensorflow()
        import tensorflow_datasets as tfds

        self.tfds, self.split, self.kind = tfds, split, data_config.source
        self.image_key, self.label_key = data_config.image_key, data_config.label_key
        if self.kind == "folder":
            if not os.path.isdir(os.path.join(data_config.data_dir, split)):
                raise FileNotFoundError(
                    f"image folder {data_config.data_dir}/{split} not found: tfds ImageFolder "
                    f"reads {data_config.data_dir}/<split>/<class>/<image files>"
                )
            self.builder = tfds.folder_dataset.ImageFolder(data_config.data_dir)
            self.image_key, self.label_key = "image", "label"
        else:
            name, data_dir = data_config.name, data_config.data_dir or None
            try:
                self.builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
                self.builder.info.splits[split].num_examples  # noqa: B018 - raises if unprepared
            except Exception as err:  # DatasetNotFoundError, unknown split, no files
                reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                raise FileNotFoundError(
                    f"TFDS dataset {name!r} (split {split!r}) is not prepared under "
                    f"data_dir={data_dir or '~/tensorflow_datasets'}: {reason}\n"
                    "Nothing is downloaded during training. Prepare it once, e.g.\n"
                    f"  tfds build {name} --data_dir=DATA_DIR\n"
                    "(ImageNet needs the manual tar files in DATA_DIR/downloads/manual)."
                ) from err
        info = self.builder.info
        if split not in info.splits:
            raise ValueError(f"{self.kind} dataset has splits {list(info.splits)}, not {split!r}")
        self.num_examples = int(info.splits[split].num_examples)
        label = info.features[self.label_key]
        self.num_classes = int(getattr(label, "num_classes", 0) or 0)
        self.classes = list(getattr(label, "names", []) or [])
        shape = info.features[self.image_key].shape
        self.channels = int(shape[-1]) if shape and shape[-1] else 3

    def __len__(self) -> int:
        return self.num_examples

    def records(self, *, seed: int, train: bool, process_index: int = 0, process_count: int = 1):
        """tf.data of {image: encoded bytes, label}: this process's share for training (shuffled
        files, fixed seed) or the whole split in order for evaluation."""
        tfds, tf = self.tfds, self.tf
        decoders = {self.image_key: tfds.decode.SkipDecoding()}
        if self.kind == "folder":  # ImageFolder has no sub-split API; shard the file list
            ds = self.builder.as_dataset(split=self.split, shuffle_files=False, decoders=decoders)
            if train and process_count > 1:
                ds = ds.shard(process_count, process_index)
        else:
            split = self.split
            if train and process_count > 1:
                split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
            ds = self.builder.as_dataset(
                split=split,
                shuffle_files=train,
                decoders=decoders,
                read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
            )
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).map(
            lambda ex: {"image": ex[self.image_key], "label": ex[self.label_key]}
        )

    def decode(self, encoded):
        return self.tf.io.decode_image(encoded, channels=self.channels, expand_animations=False)

    def first(self, n: int) -> list[np.ndarray]:
        """The first n images of the split, decoded (for the reconstruction pictures)."""
        ds = self.records(seed=0, train=False).take(n)
        return [np.asarray(self.decode(ex["image"])) for ex in ds]


class TfDataTrainIterator:
    """This process's training batches from tf.data, with the same layout as `pipeline.py`.

    It is checkpointed by grain's orbax handler (`get_state`/`set_state` with JSON bytes).
    """

    def __init__(
        self,
        source: TfDataSource,
        transform: Transform,
        *,
        global_batch: int,
        seed: int,
        num_classes: int,
        data_config: Any,
        with_labels: bool,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch % process_count:
            raise ValueError(
                f"batch_size {global_batch} is not divisible by {process_count} processes"
            )
        self.source, self.transform, self.seed = source, transform, seed
        self.local_batch = global_batch // process_count
        self.positions = LocalPositions(
            self.local_batch, global_batch, process_index * self.local_batch
        )
        self.process_index, self.process_count = process_index, process_count
        self.num_classes, self.cfg, self.with_labels = num_classes, data_config, with_labels
        self.consumed = 0  # examples of this process's stream already returned
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, int(data_config.workers)))

    # grain.checkpoint.CheckpointHandler protocol
    def get_state(self) -> bytes:
        return json.dumps({"backend": "tf.data", "consumed": self.consumed}).encode()

    def set_state(self, state: bytes) -> None:
        values = json.loads(state)
        if "consumed" not in values:
            raise ValueError(f"not a tf.data input state: {values} (was the data backend changed?)")
        self._halt()
        self.consumed = int(values["consumed"])

    def start_prefetch(self) -> None:
        pass

    def seek(self, step: int) -> None:
        """Position the stream at the first batch of `step` (no saved state to restore)."""
        self._halt()
        self.consumed = step * self.local_batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch = {
            "image": np.stack([f.result() for f in item["images"]]),
            "label": np.asarray(item["labels"], np.int64),
            "position": np.asarray(item["positions"], np.int64),
        }
        self.consumed += self.local_batch
        return finish_batch(
            batch,
            seed=self.seed,
            num_classes=self.num_classes,
            data_config=self.cfg,
            with_labels=self.with_labels,
        )

    def close(self) -> None:
        self._halt()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the producer
    def _start(self) -> None:
        tf = self.source.tf
        ds = self.source.records(
            seed=self.seed,
            train=True,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        ds = ds.shuffle(  # before repeat: every epoch visits each example once
            int(self.cfg.shuffle_buffer), seed=self.seed, reshuffle_each_iteration=True
        ).repeat()
        repeats = max(1, int(self.cfg.repeated_aug))
        if repeats > 1:  # repeated augmentation: each record R times in a row
            ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats))
        ds = ds.skip(self.consumed)  # records are still encoded here: skipping reads, not decodes
        ds = ds.map(
            lambda ex: {"image": self.source.decode(ex["image"]), "label": ex["label"]},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).prefetch(self.local_batch)
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, int(self.cfg.prefetch)))
        self._thread = threading.Thread(
            target=self._produce, args=(ds.as_numpy_iterator(), self.consumed), daemon=True
        )
        self._thread.start()

    def _example(self, position: int, image: np.ndarray) -> np.ndarray:
        return self.transform(image, np.random.default_rng([self.seed, position]))

    def _produce(self, records, index: int) -> None:
        try:
            while not self._stop.is_set():
                item = {"images": [], "labels": [], "positions": []}
                for _ in range(self.local_batch):
                    ex = next(records)
                    position = self.positions[index]
                    index += 1
                    item["images"].append(self._pool.submit(self._example, position, ex["image"]))
                    item["labels"].append(int(ex["label"]))
                    item["positions"].append(position)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # surfaced by __next__
            self._queue.put(err)

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = None


def eval_batches(
    source: TfDataSource,
    transform: Transform,
    *,
    global_batch: int,
    max_examples: int = 0,
    with_labels: bool,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """The eval split in order with the layout of `pipeline.eval_batches` (each process decodes
    only its rows of every global batch; it reads all records, since TFRecord has no index)."""
    tf = source.tf
    total = len(source) if not max_examples else min(max_examples, len(source))
    local_batch = global_batch // process_count
    row0 = process_index * local_batch
    num_batches = -(-total // global_batch)
    ds = source.records(seed=0, train=False).take(total).enumerate()
    ds = ds.filter(lambda i, ex: (i % global_batch) // local_batch == process_index)
    ds = ds.map(
        lambda i, ex: {"image": source.decode(ex["image"]), "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    records = ds.as_numpy_iterator()
    pad = None  # padding rows repeat the split's first example, as in `pipeline.eval_batches`
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for b in range(num_batches):
            rows = []
            for r in range(local_batch):
                position = b * global_batch + row0 + r
                rows.append((position, next(records) if position < total else None))
            if pad is None and any(ex is None for _, ex in rows):
                first = next(source.records(seed=0, train=False).take(1).as_numpy_iterator())
                pad = {"image": np.asarray(source.decode(first["image"])), "label": first["label"]}
            rows = [(position, ex if ex is not None else pad) for position, ex in rows]
            images = pool.map(
                lambda pe: transform(pe[1]["image"], np.random.default_rng([0, pe[0]])), rows
            )
            batch = {
                "image": np.stack(list(images)).astype(np.float32),
                "valid": np.asarray([p < total for p, _ in rows], np.bool_),
            }
            if with_labels:
                batch["label"] = np.asarray([ex["label"] for _, ex in rows], np.int32)
            yield batch
