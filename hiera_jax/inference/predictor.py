"""Inference: jitted batched prediction, top-k names and feature maps for one model.

Three lines from a converted checkpoint to named predictions:

    from hiera_jax import inference
    predictor = inference.Predictor.from_pretrained("checkpoints/hiera_tiny_224")
    print(predictor.top_k(["cat.jpg"], k=5))

Images go through `hiera_jax.inference.preprocess`: the model's image processor settings when
its directory has a `preprocessor_config.json` (transformers' repos, models saved here), the
official pipeline otherwise; `HieraImageProcessor` runs the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from hiera_jax import families
from hiera_jax.inference.artifact import load_exported
from hiera_jax.inference.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIDEO_TEMPORAL_STRIDE,
    class_names,
    load_video,
    preprocess_image,
    preprocess_video,
    processor_transform,
    transform_image,
)


# ---------------------------------------------------------------------- prediction
@functools.cache
def _jitted_probs(config: Any):
    """`(params, x) -> softmax(logits)`, jitted once per config (the family's classifier)."""
    classifier = families.of_config(config).classifier(config)
    return jax.jit(lambda p, x: jax.nn.softmax(classifier.apply({"params": p}, x), axis=-1))


@functools.cache
def _jitted_maps(config: Any, neck: Any = None):
    """`(params, x) -> per-stage maps` (a tuple for Hiera; a dict for HieraDet, with SAM 2's
    `ImageEncoder` outputs where it has a neck), jitted once per config."""
    return jax.jit(families.of_config(config).features(config, neck))


def _bucket(n: int, batch_size: int) -> int:
    """Padded batch for `n` inputs: the next power of two up to `batch_size` (few compiles)."""
    return min(batch_size, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Predictor:
    """Jitted, batched class probabilities, top-k names and feature maps for one model.

    Inputs are a sequence (list, or a batch array along its first axis) of raw images: PIL
    images, file paths, or channels-last arrays [H, W] / [H, W, C] with C in (1, 3, 4) (RGBA
    loses its alpha; one channel is repeated for RGB models, RGB becomes luma for 1-channel
    models). Video models take clips instead: a file path, a folder of frames, a sequence of
    frames or an array [T, H, W, C].

    Value-range policy, so 0-255 data can never pass as a washed-out [0, 1] image:

    - uint8 arrays (and PIL images) are 0-255; 16-bit PIL images are scaled to 0-255.
    - float arrays are [0, 1] (ToTensor-style). Values below -0.5 or above 1.5 raise
      ValueError ("float images must be in [0, 1] ..."): pass uint8 for 0-255 data or divide
      by 255. The margin admits resampling overshoot, nothing more.
    - other dtypes (int64, bool, ...), NaN or inf, an empty input list or batch, a single image
      where a sequence is expected, and channels-first [C, H, W] arrays raise ValueError.

    `preprocessed=True` skips the pipeline: the batch must already be the model's normalised
    float input [B, (T), H, W, C]; integer dtypes, NaN/inf, empty batches and values far outside
    what normalising [0, 1] pixels with this predictor's mean/std gives raise ValueError.

    SAM 2's HieraDet (`from_pretrained` of a SAM 2 / timm / transformers name or path, or
    `from_hieradet`): `config` is its HieraDetConfig and `neck` the FPN's where the checkpoint has
    it; `features` then also gives SAM 2's `ImageEncoder` outputs.

    `devices` (default: one device) splits every batch over these devices along a "data" mesh
    axis, the params replicated: each chunk is padded to a multiple of their number, so
    `batch_size` is per step, over all of them.
    """

    def __init__(
        self,
        config: Any,  # the family's config (HieraConfig, HieraDetConfig)
        params: Any,
        *,
        model_type: str = "classification",
        batch_size: int = 8,
        names: Sequence[str] | None = None,
        temporal_stride: int = VIDEO_TEMPORAL_STRIDE,
        source: str = "model",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: dict[str, Any] | None = None,
        neck: Any = None,  # SAM 2's FpnNeckConfig, for its ImageEncoder outputs
        devices: Sequence[jax.Device] | None = None,
    ):
        """`transform`: `transform_image` keywords for images (`processor_transform` of an image
        processor's settings); None = the official pipeline at the model's input size."""
        if len(mean) != config.in_chans or len(std) != config.in_chans:
            raise ValueError(
                f"{source}: mean/std have {len(mean)}/{len(std)} values but the model takes "
                f"{config.in_chans} channels"
            )
        self.mean, self.std = tuple(mean), tuple(std)
        self.config = config
        self.params = params
        self.model_type = model_type
        self.batch_size = batch_size
        self.temporal_stride = temporal_stride
        self.source = source
        self.has_head = model_type == "classification"
        if names is None:
            names = getattr(config, "class_names", None) or class_names(config.num_classes)
        self.names = tuple(names)
        self.transform = transform
        self.neck = neck
        self.is_video = bool(getattr(config, "is_video", False))
        self._probs = _jitted_probs(config)
        self._maps = _jitted_maps(config, neck)
        self.mesh = None
        if devices is not None and len(devices) > 1:
            self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            self.params = jax.device_put(params, replicated)

    # construction --------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str, **overrides: Any) -> Predictor:
        """Load a `save_pretrained` / converter / train.py directory (or a finished workdir: its
        `model/`), or any name `hiera_jax.load_pretrained` takes (hub names, repo ids), of any
        model family (its record's `load_for_inference`: SAM 2's HieraDet names, repos and files
        included); overrides: `input_size`, `dtype`, `devices`, `batch_size`... and the family's
        loader's keywords (HieraDet: `encoder`)."""
        batch_size = overrides.pop("batch_size", 8)
        devices = overrides.pop("devices", None)
        loaded = families.dispatch(
            directory, lambda family, path: family.load_for_inference(path, **dict(overrides))
        )
        return cls._from_loaded(loaded, batch_size=batch_size, devices=devices)

    @classmethod
    def from_hieradet(cls, name_or_path: str, **overrides: Any) -> Predictor:
        """SAM 2's Hiera from any `hiera_jax.load_hieradet` source (HieraDet's
        `load_for_inference`: the classifier, the trunk, or trunk + FPN neck)."""
        batch_size = overrides.pop("batch_size", 8)
        devices = overrides.pop("devices", None)
        loaded = families.get("hieradet").load_for_inference(name_or_path, **overrides)
        return cls._from_loaded(loaded, batch_size=batch_size, devices=devices)

    @classmethod
    def random(
        cls, name: str, *, seed: int = 0, batch_size: int = 8, **overrides: Any
    ) -> Predictor:
        """A randomly initialised official variant: for demos and tests, predictions mean nothing.

        SAM 2's names (`sam2_hiera_tiny`, ...) give its image encoder (trunk + FPN neck)."""
        devices = overrides.pop("devices", None)
        loaded = families.for_name(name).random_for_inference(name, seed, **overrides)
        return cls._from_loaded(loaded, batch_size=batch_size, devices=devices)

    @classmethod
    def from_exported(cls, path: str | os.PathLike, *, batch_size: int = 8) -> Predictor:
        """A Predictor that runs a `hiera_jax.export_model` artifact, with the preprocessing,
        class names and outputs its JSON records (the live model's); no Flax module or
        parameters are involved. An artifact of a fixed batch size runs at that size."""
        call, meta = load_exported(path)
        *size, channels = meta["input_shape"][1:]
        fixed = meta["input_shape"][0]
        if not isinstance(fixed, str):
            batch_size = int(fixed)
        self = cls.__new__(cls)
        labels = meta["labels"] or []
        self.config = _ExportedShape(tuple(size), int(channels), len(labels))
        self.params = None
        self.model_type = meta["model_type"]
        self.batch_size = batch_size
        self.temporal_stride = meta["temporal_stride"]
        self.source = os.fspath(path)
        self.has_head = meta["task"] == "classify"
        self.names = tuple(labels)
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        transform = meta["transform"]
        self.transform = None if transform is None else _tuples(transform)
        self.neck = None
        self.is_video = len(size) == 3
        self.mesh = None

        def run(params: Any, x: Any) -> Any:
            del params
            n = x.shape[0]
            if not isinstance(fixed, str) and n < fixed:  # the artifact's one batch size
                x = jnp.concatenate([x, jnp.zeros((fixed - n, *x.shape[1:]), x.dtype)])
            return jax.tree.map(lambda a: a[:n], call(x))

        self._probs = self._maps = run
        return self

    @classmethod
    def _from_loaded(
        cls, loaded: families.Loaded, *, batch_size: int, devices: Sequence[jax.Device] | None
    ) -> Predictor:
        """A family's `Loaded`: normalised as the model was trained (its processor, train.py's
        data statistics or the checkpoint's), ImageNet's otherwise; the image processor's
        pipeline when it has one for the model's size, the family's transform, or the official
        pipeline."""
        mean = loaded.mean or IMAGENET_MEAN
        std = loaded.std or IMAGENET_STD
        transform = None
        if loaded.transform is not None:
            transform = {**loaded.transform, "mean": mean, "std": std}
        elif loaded.preprocessing:
            transform = processor_transform(loaded.preprocessing)
            if transform.get("crop") != tuple(loaded.config.input_size[-2:]):
                transform = None  # run at another size: the official pipeline for that size
        return cls(
            loaded.config,
            loaded.params,
            model_type=loaded.model_type,
            batch_size=batch_size,
            source=loaded.source,
            mean=mean,
            std=std,
            transform=transform,
            neck=loaded.neck,
            devices=devices,
        )

    # preprocessing -------------------------------------------------------------
    def _check_sequence(self, inputs: Any) -> None:
        """ValueError when `inputs` is one image (or clip) rather than a sequence of them."""
        kind = "clip" if self.is_video else "image"
        if isinstance(inputs, (str, os.PathLike, Image.Image)):
            raise ValueError(
                f"expected a sequence of inputs, got one {type(inputs).__name__}; for one {kind} "
                f"pass [{kind}]"
            )
        if hasattr(inputs, "ndim"):  # an array: a batch along its first axis
            one = 4 if self.is_video else 3  # [T, H, W, C] / [H, W, C]
            if inputs.ndim < one or (inputs.ndim == one and inputs.shape[-1] in (1, 3, 4)):
                layout = "[B, T, H, W, C]" if self.is_video else "[B, H, W, C]"
                raise ValueError(
                    f"expected a batch {layout} or a list of {kind}s, got an array of shape "
                    f"{tuple(inputs.shape)} (one {kind}?); for one {kind} pass [{kind}]"
                )

    def preprocess(self, inputs: Iterable[Any]) -> np.ndarray:
        """Images (or clips for video models) of any size -> the model's input batch."""
        self._check_sequence(inputs)
        cfg = self.config
        crop = tuple(cfg.input_size[-2:])
        out = []
        for index, item in enumerate(inputs):
            path = isinstance(item, (str, os.PathLike))
            name = os.fspath(item) if path else f"input {index}"
            if self.is_video:
                frames = load_video(item) if isinstance(item, (str, os.PathLike)) else item
                out.append(
                    preprocess_video(
                        frames,
                        cfg.input_size[0],
                        self.temporal_stride,
                        crop,
                        source=name,
                        mean=self.mean,
                        std=self.std,
                    )
                )
            elif self.transform is not None:
                out.append(transform_image(item, **self.transform, source=name))
            else:
                out.append(preprocess_image(item, crop, mean=self.mean, std=self.std, source=name))
        if not out:
            raise ValueError("no inputs given (empty list or batch)")
        return np.stack(out)

    def _check_preprocessed(self, inputs: Any) -> np.ndarray:
        """A normalised float32 batch, or ValueError for input that cannot be one."""
        batch = np.asarray(inputs)
        if not np.issubdtype(batch.dtype, np.floating):
            raise ValueError(
                f"preprocessed=True takes the model's normalised float input, got dtype "
                f"{batch.dtype}; pass raw images without preprocessed=True (uint8 0-255 or float "
                "0-1), or normalise as (x / 255 - mean) / std"
            )
        if batch.ndim == 0 or batch.shape[0] == 0:
            raise ValueError(f"no inputs given (empty batch of shape {batch.shape})")
        batch = batch.astype(np.float32, copy=False)
        if not np.isfinite(batch).all():
            raise ValueError("preprocessed input holds NaN or inf values")
        # Normalised pixels lie in [(0 - mean) / std, (1 - mean) / std]; allow pixel values in
        # [-1, 2] (resampling overshoot) before calling the batch raw pixels.
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        lo_ok, hi_ok = float(np.min((-1 - mean) / std)), float(np.max((2 - mean) / std))
        lo, hi = float(batch.min()), float(batch.max())
        if lo < lo_ok or hi > hi_ok:
            raise ValueError(
                f"preprocessed input has values in [{lo:.4g}, {hi:.4g}], outside what normalised "
                f"images give (about [{float(np.min(-mean / std)):.3g}, "
                f"{float(np.max((1 - mean) / std)):.3g}] for mean {self.mean}, std {self.std}); "
                "pass raw images without preprocessed=True, or normalise as (x / 255 - mean) / std"
            )
        return batch

    def _run(self, fn, batch: np.ndarray):
        """`fn(params, x)` over `batch` in padded chunks of at most `batch_size` (rounded up to
        a multiple of the mesh's devices, each taking an equal slice)."""
        results = []
        shards = self.mesh.size if self.mesh is not None else 1
        for begin in range(0, len(batch), self.batch_size):
            chunk = batch[begin : begin + self.batch_size]
            n = len(chunk)
            padded = -(-_bucket(n, self.batch_size) // shards) * shards
            if padded > n:
                chunk = np.concatenate(
                    [chunk, np.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)]
                )
            if self.mesh is not None:
                data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
                # Under the mesh, the TPU kernels (custom calls XLA cannot split) run per device.
                with jax.set_mesh(self.mesh):
                    out = jax.device_get(fn(self.params, jax.device_put(chunk, data)))
            else:
                out = jax.device_get(fn(self.params, jnp.asarray(chunk)))
            results.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], out))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *results)

    # outputs -------------------------------------------------------------------
    def predict(
        self, inputs: Iterable[Any] | np.ndarray, *, preprocessed: bool = False
    ) -> np.ndarray:
        """Class probabilities [B, num_classes] (float32, rows sum to 1)."""
        if not self.has_head:
            raise ValueError(
                f"{self.source} is a {self.model_type} checkpoint with no classifier head: it "
                "gives features, not class probabilities"
            )
        batch = self._check_preprocessed(inputs) if preprocessed else self.preprocess(inputs)
        return self._run(self._probs, batch)

    def top_k(self, inputs: Iterable[Any], k: int = 5) -> list[list[tuple[str, float]]]:
        """Per input, the `k` most probable (class name, probability), best first.

        `k` must be a positive integer; above the number of classes it gives every class.
        """
        check_top_k(k)
        probs = self.predict(inputs)
        k = min(int(k), probs.shape[-1])
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [[(self.names[i], float(p[i])) for i in row] for row, p in zip(order, probs)]

    def features(
        self, inputs: Iterable[Any] | np.ndarray, *, preprocessed: bool = False
    ) -> dict[str, np.ndarray]:
        """Per-stage maps `stage{i}`: [B, (T), H, W, C] in spatial order, channels-last.

        With SAM 2's neck also its `ImageEncoder` outputs, NHWC: `vision_features`,
        `backbone_fpn{i}` and `vision_pos_enc{i}` (finest first, as SAM 2's lists)."""
        batch = self._check_preprocessed(inputs) if preprocessed else self.preprocess(inputs)
        maps = self._run(self._maps, batch)
        if isinstance(maps, dict):
            return maps
        return {f"stage{i + 1}": m for i, m in enumerate(maps)}


@dataclasses.dataclass(frozen=True)
class _ExportedShape:
    """What preprocessing reads of a config, for a Predictor over an exported artifact."""

    input_size: tuple[int, ...]
    in_chans: int
    num_classes: int
    class_names: tuple[str, ...] | None = None

    @property
    def is_video(self) -> bool:
        return len(self.input_size) == 3


def _tuples(value: Any) -> Any:
    """JSON lists back as the tuples the transform was written from."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def check_top_k(k: Any) -> None:
    """ValueError unless `k` is a positive integer (0 would print nothing, -1 almost everything)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (top-k) must be a positive integer, got {k!r}")


def predict(
    model: nn.Module, params: Any, images: Iterable[Any], batch_size: int = 8
) -> np.ndarray:
    """Probabilities of a classifier `model` for images (or clips) of any size."""
    return Predictor(model.config, params, batch_size=batch_size).predict(images)
