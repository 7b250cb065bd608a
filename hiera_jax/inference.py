"""Inference: the official preprocessing, jitted batched prediction, top-k names, features.

Three lines from a converted checkpoint to named predictions:

    from hiera_jax import inference
    predictor = inference.Predictor.from_pretrained("checkpoints/hiera_tiny_224")
    print(predictor.top_k(["cat.jpg"], k=5))

Preprocessing is the official Hiera inference example (`examples/inference.ipynb`):
`Resize(int(256 / 224 * size), BICUBIC)` on the short side, `CenterCrop(size)`, `ToTensor`,
`Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)`. It runs on PIL images with the same PIL
calls torchvision makes, so the result equals torchvision's to float32 rounding, but channels-last.
Video models take clips of `T` frames sampled at temporal stride 4 (16 x 4 for the official
Kinetics models); every frame goes through the image pipeline.
"""

from __future__ import annotations

import functools
import glob
import math
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from hiera_jax.config import HieraConfig, get_config
from hiera_jax.convert import build_model
from hiera_jax.io import load_pretrained, read_config, read_preprocessing
from hiera_jax.model import HieraEncoder, HieraForImageClassification, init_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT_STD
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's RGB -> "L" conversion
RESIZE_RATIO = 256 / 224  # the official example resizes the short side to 256 for a 224 crop
VIDEO_TEMPORAL_STRIDE = 4  # the official Kinetics models see 16 frames, 4 apart
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")

_CLASS_FILES = {1000: "imagenet1k_classes.txt", 400: "kinetics400_classes.txt"}


# ---------------------------------------------------------------------- class names
@functools.cache
def class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet-1K names for 1000 classes, Kinetics-400 for 400, `class_{i}` otherwise."""
    if num_classes in _CLASS_FILES:
        text = resources.files("hiera_jax").joinpath("data", _CLASS_FILES[num_classes]).read_text()
        names = tuple(line for line in text.splitlines() if line)
        if len(names) != num_classes:
            raise RuntimeError(f"bundled {_CLASS_FILES[num_classes]} has {len(names)} names")
        return names
    return tuple(f"class_{i}" for i in range(num_classes))


# ---------------------------------------------------------------------- images
def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image from a file; OSError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def _to_pil(image: Any) -> Image.Image | list[Image.Image]:
    """PIL RGB image, or one float ('F') PIL image per channel for float arrays in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an image array [H, W] or [H, W, C] with C in (1, 3, 4), got shape "
            f"{array.shape}"
        )
    array = array[..., :3]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return Image.fromarray(array, "RGB")
    if np.issubdtype(array.dtype, np.floating):
        # Floats are taken as ToTensor-style values in [0, 1]; resampled per channel in 'F' mode.
        return [
            Image.fromarray(np.ascontiguousarray(array[..., c], np.float32), "F") for c in range(3)
        ]
    raise ValueError(f"image arrays must be uint8 (0-255) or float (0-1), got {array.dtype}")


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) after torchvision `Resize(short_side)`: the long side is truncated, not rounded."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def preprocess_image(
    image: Any,
    crop_size: int | Sequence[int] = 224,
    resize_size: int | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """One image (PIL, path, uint8 or [0, 1] float array) -> normalised float32 [H, W, C].

    C = len(mean): 3 for the official models; 1 gives grayscale (ITU-R 601 luma, as PIL's "L").
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if resize_size is None:
        resize_size = int(RESIZE_RATIO * min(crop_h, crop_w))
    pil = _to_pil(image)
    channels = pil if isinstance(pil, list) else [pil]
    width, height = channels[0].size
    new_h, new_w = resized_size(height, width, resize_size)
    if (new_h, new_w) != (height, width):  # torchvision skips an identity resize
        channels = [c.resize((new_w, new_h), Image.BICUBIC) for c in channels]
    # torchvision CenterCrop (pads with zeros first when the image is smaller than the crop).
    if new_h < crop_h or new_w < crop_w:
        pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
        box = (-(pad_w // 2), -(pad_h // 2), new_w + (pad_w + 1) // 2, new_h + (pad_h + 1) // 2)
        channels = [c.crop(box) for c in channels]
        new_w, new_h = channels[0].size
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    channels = [c.crop((left, top, left + crop_w, top + crop_h)) for c in channels]
    if len(channels) == 1:
        x = np.asarray(channels[0], dtype=np.float32) / np.float32(255.0)  # ToTensor
    else:
        x = np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=-1)
    if len(mean) == 1:
        x = (x @ np.asarray(GRAY_WEIGHTS, np.float32))[..., None]
    elif len(mean) != 3:
        raise ValueError(f"images can be preprocessed to 1 or 3 channels, not {len(mean)}")
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ---------------------------------------------------------------------- video
def clip_indices(
    num_available: int,
    num_frames: int = 16,
    stride: int = VIDEO_TEMPORAL_STRIDE,
    *,
    start: int | None = None,
    source: str = "clip",
) -> np.ndarray:
    """Frame indices of one clip: `num_frames` frames `stride` apart, centred unless `start`."""
    span = (num_frames - 1) * stride + 1
    if num_available < span:
        raise ValueError(
            f"{source} has {num_available} frames, but a clip of {num_frames} frames at temporal "
            f"stride {stride} needs at least {span}"
        )
    if start is None:
        start = (num_available - span) // 2
    if not 0 <= start <= num_available - span:
        raise ValueError(
            f"{source}: start frame {start} leaves fewer than {span} frames (has {num_available})"
        )
    return start + stride * np.arange(num_frames)


def load_video(path: str | os.PathLike) -> list[Any]:
    """Frames of a clip file: `.npy`/`.npz` array [T, H, W, C], a folder of images, an animated
    GIF, or (with PyAV installed) any video container."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    try:
        if os.path.isdir(path):
            files = sorted(
                f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(IMAGE_SUFFIXES)
            )
            if not files:
                raise ValueError("the folder holds no image frames")
            return [load_image(f) for f in files]
        lower = path.lower()
        if lower.endswith((".npy", ".npz")):
            data = np.load(path)
            if isinstance(data, np.lib.npyio.NpzFile):
                key = "frames" if "frames" in data.files else data.files[0]
                data = data[key]
            if data.ndim != 4:
                raise ValueError(f"expected an array [T, H, W, C], got shape {data.shape}")
            return list(data)
        if lower.endswith(".gif"):
            with Image.open(path) as gif:
                return [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
        try:
            import av  # noqa: PLC0415 (optional dependency)
        except ImportError as err:
            raise ValueError(
                "reading video containers needs PyAV (`pip install av`); or pass a .npy array "
                "[T, H, W, C], a folder of frames or an animated GIF"
            ) from err
        with av.open(path) as container:
            return [f.to_image() for f in container.decode(video=0)]
    except (FileNotFoundError, ValueError) as err:
        if path in str(err):
            raise
        raise type(err)(f"cannot read video {path}: {err}") from err
    except OSError as err:
        raise OSError(f"cannot read video {path}: {err}") from err


def preprocess_video(
    frames: Sequence[Any] | np.ndarray,
    num_frames: int = 16,
    stride: int = VIDEO_TEMPORAL_STRIDE,
    crop_size: int | Sequence[int] = 224,
    *,
    start: int | None = None,
    source: str = "clip",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """A clip (frames as PIL / arrays, or [T, H, W, C]) -> normalised float32 [T', H, W, C]."""
    idx = clip_indices(len(frames), num_frames, stride, start=start, source=source)
    return np.stack([preprocess_image(frames[int(i)], crop_size, mean=mean, std=std) for i in idx])


# ---------------------------------------------------------------------- prediction
class _Features(HieraEncoder):
    """The encoder alone: per-stage maps from any checkpoint (classifier, backbone or MAE)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        _, maps = self.encode(x, None, train=False, return_intermediates=True)
        return tuple(maps)


@functools.cache
def _jitted_probs(config: HieraConfig):
    """`(params, x) -> softmax(logits)`, jitted once per config."""
    classifier = HieraForImageClassification(config)
    return jax.jit(lambda p, x: jax.nn.softmax(classifier.apply({"params": p}, x), axis=-1))


@functools.cache
def _jitted_maps(config: HieraConfig):
    """`(params, x) -> per-stage maps`, jitted once per config."""
    features = _Features(config)
    return jax.jit(lambda p, x: features.apply({"params": p}, x))


def _bucket(n: int, batch_size: int) -> int:
    """Padded batch for `n` inputs: the next power of two up to `batch_size` (few compiles)."""
    return min(batch_size, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Predictor:
    """Jitted, batched class probabilities, top-k names and feature maps for one model."""

    def __init__(
        self,
        config: HieraConfig,
        params: Any,
        *,
        model_type: str = "classification",
        batch_size: int = 8,
        names: Sequence[str] | None = None,
        temporal_stride: int = VIDEO_TEMPORAL_STRIDE,
        source: str = "model",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
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
        self.names = tuple(names) if names is not None else class_names(config.num_classes)
        self._probs = _jitted_probs(config)
        self._maps = _jitted_maps(config)

    # construction --------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str, **overrides: Any) -> Predictor:
        """Load a `save_pretrained` / converter / train.py directory (`input_size`, `dtype`...)."""
        _, model_type, _ = read_config(directory)
        # Normalise as the model was trained (train.py stores it); ImageNet's for converted ones.
        norm = read_preprocessing(directory) or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        batch_size = overrides.pop("batch_size", 8)
        model, params = load_pretrained(directory, **overrides)
        return cls(
            model.config,
            params,
            model_type=model_type,
            batch_size=batch_size,
            source=directory,
            mean=norm["mean"],
            std=norm["std"],
        )

    @classmethod
    def random(
        cls, name: str, *, seed: int = 0, batch_size: int = 8, **overrides: Any
    ) -> Predictor:
        """A randomly initialised official variant: for demos and tests, predictions mean nothing."""
        config = get_config(name, **overrides)
        model_type = "pretraining" if name.startswith("mae_") else "classification"
        params = init_params(build_model(config, model_type), jax.random.key(seed))
        return cls(
            config, params, model_type=model_type, batch_size=batch_size, source=f"random {name}"
        )

    # preprocessing -------------------------------------------------------------
    def preprocess(self, inputs: Iterable[Any]) -> np.ndarray:
        """Images (or clips for video models) of any size -> the model's input batch."""
        cfg = self.config
        crop = tuple(cfg.input_size[-2:])
        out = []
        for item in inputs:
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else "clip"
            if cfg.is_video:
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
            else:
                out.append(preprocess_image(item, crop, mean=self.mean, std=self.std))
        if not out:
            raise ValueError("no inputs given")
        return np.stack(out)

    def _run(self, fn, batch: np.ndarray):
        """`fn(params, x)` over `batch` in padded chunks of at most `batch_size`."""
        results = []
        for begin in range(0, len(batch), self.batch_size):
            chunk = batch[begin : begin + self.batch_size]
            n = len(chunk)
            padded = _bucket(n, self.batch_size)
            if padded > n:
                chunk = np.concatenate(
                    [chunk, np.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)]
                )
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
        batch = np.asarray(inputs, np.float32) if preprocessed else self.preprocess(inputs)
        return self._run(self._probs, batch)

    def top_k(self, inputs: Iterable[Any], k: int = 5) -> list[list[tuple[str, float]]]:
        """Per input, the `k` most probable (class name, probability), best first."""
        probs = self.predict(inputs)
        k = min(k, probs.shape[-1])
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [[(self.names[i], float(p[i])) for i in row] for row, p in zip(order, probs)]

    def features(
        self, inputs: Iterable[Any] | np.ndarray, *, preprocessed: bool = False
    ) -> dict[str, np.ndarray]:
        """Per-stage maps `stage{i}`: [B, (T), H, W, C] in spatial order, channels-last."""
        batch = np.asarray(inputs, np.float32) if preprocessed else self.preprocess(inputs)
        maps = self._run(self._maps, batch)
        return {f"stage{i + 1}": m for i, m in enumerate(maps)}


def predict(
    model: nn.Module, params: Any, images: Iterable[Any], batch_size: int = 8
) -> np.ndarray:
    """Probabilities of a classifier `model` for images (or clips) of any size."""
    return Predictor(model.config, params, batch_size=batch_size).predict(images)
