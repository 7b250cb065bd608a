"""Image and video preprocessing: the official Hiera pipeline, on PIL, channels-last.

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
import os
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT_STD
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's RGB -> "L" conversion
RESIZE_RATIO = 256 / 224  # the official example resizes the short side to 256 for a 224 crop
VIDEO_TEMPORAL_STRIDE = 4  # the official Kinetics models see 16 frames, 4 apart
FLOAT_IMAGE_RANGE = (-0.5, 1.5)  # float images outside this are refused (0-255 data?)
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
            return _pil_to_rgb(image, os.fspath(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except ValueError as err:
        if str(err).startswith(f"{os.fspath(path)}: "):  # the value checks of _pil_to_rgb
            raise
        raise OSError(f"cannot read image {path}: {err}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def _pil_to_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """An RGB PIL image; 16-bit images are scaled to 8 bits (PIL's own convert would clip them)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        array = np.asarray(image, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(
                f"{source}: 32-bit integer image with values in [{array.min()}, {array.max()}]; "
                "convert it to uint8 (0-255) or a float array in [0, 1]"
            )
        gray = np.round(array / 257.0).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        check_float_range(array, source)
        gray = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def check_float_range(array: np.ndarray, source: str = "image") -> None:
    """The value-range policy for float images: finite and in [0, 1] (a little overshoot is fine).

    Floats outside [-0.5, 1.5] are almost surely 0-255 data (or already normalised input), which
    would otherwise be taken as very bright [0, 1] images and give confident wrong answers.
    """
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: the image array holds NaN or inf values")
    lo, hi = float(array.min()), float(array.max())
    if lo < FLOAT_IMAGE_RANGE[0] or hi > FLOAT_IMAGE_RANGE[1]:
        raise ValueError(
            f"{source}: float images must be in [0, 1] (got range [{lo:.4g}, {hi:.4g}]); pass "
            "uint8 for 0-255 data or divide by 255"
        )


def _to_pil(image: Any, source: str = "image") -> Image.Image | list[Image.Image]:
    """PIL RGB image, or one float ('F') PIL image per channel for float arrays in [0, 1]."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, source)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        raise ValueError(
            f"{source}: image array of shape {array.shape} looks channels-first [C, H, W]; "
            "images are channels-last [H, W, C]: pass x.transpose(1, 2, 0)"
        )
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{source}: expected an image array [H, W] or [H, W, C] with C in (1, 3, 4), got "
            f"shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"{source}: empty image array of shape {array.shape}")
    array = array[..., :3]  # RGBA: the alpha channel is dropped
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return Image.fromarray(array, "RGB")
    if np.issubdtype(array.dtype, np.floating):
        check_float_range(array, source)
        # Floats are taken as ToTensor-style values in [0, 1]; resampled per channel in 'F' mode.
        return [
            Image.fromarray(np.ascontiguousarray(array[..., c], np.float32), "F") for c in range(3)
        ]
    raise ValueError(
        f"{source}: image arrays must be uint8 (0-255) or float in [0, 1], got {array.dtype}; "
        "convert 0-255 integers with x.astype(np.uint8)"
    )


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
    source: str = "image",
) -> np.ndarray:
    """One image (PIL, path, uint8 or [0, 1] float array) -> normalised float32 [H, W, C].

    C = len(mean): 3 for the official models; 1 gives grayscale (ITU-R 601 luma, as PIL's "L").
    Float arrays outside [-0.5, 1.5] or not finite raise ValueError (see `check_float_range`);
    `source` names the image in errors.
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if resize_size is None:
        resize_size = int(RESIZE_RATIO * min(crop_h, crop_w))
    pil = _to_pil(image, os.fspath(image) if isinstance(image, (str, os.PathLike)) else source)
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
    if isinstance(frames, (str, os.PathLike, Image.Image)) or not hasattr(frames, "__len__"):
        raise ValueError(
            f"{source}: a clip is a sequence of frames or an array [T, H, W, C], got "
            f"{type(frames).__name__}"
        )
    if hasattr(frames, "ndim") and frames.ndim != 4:
        raise ValueError(f"{source}: a clip array must be [T, H, W, C], got shape {frames.shape}")
    idx = clip_indices(len(frames), num_frames, stride, start=start, source=source)
    return np.stack(
        [
            preprocess_image(
                frames[int(i)], crop_size, mean=mean, std=std, source=f"{source} frame {int(i)}"
            )
            for i in idx
        ]
    )
