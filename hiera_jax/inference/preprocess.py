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
from collections.abc import Mapping, Sequence
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


def crop_start(size: int, crop: int, rounding: str = "round") -> int:
    """Where a centre crop of `crop` pixels starts in a side of `size` (negative: zero padding).

    "round": torchvision's `CenterCrop` (pads `(crop - size) // 2` first when the image is
    smaller, else starts at `round((size - crop) / 2)`); "floor": transformers' `center_crop`,
    `(size - crop) // 2` either way. They differ only by one pixel, for some odd differences.
    """
    if rounding == "floor":
        return (size - crop) // 2
    if rounding != "round":
        raise ValueError(f"crop rounding must be 'round' or 'floor', got {rounding!r}")
    return int(round((size - crop) / 2.0)) if size >= crop else -((crop - size) // 2)


def transform_image(
    image: Any,
    *,
    short_side: int | None = None,
    resize_to: Sequence[int] | None = None,
    resample: int = Image.BICUBIC,
    crop: Sequence[int] | None = None,
    crop_rounding: str = "round",
    rescale_factor: float | None = 1 / 255,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    channels: int | None = None,
    source: str = "image",
) -> np.ndarray:
    """The image pipeline both the Predictor and `HieraImageProcessor` run, on PIL: resize
    (`short_side`, aspect kept, the long side truncated; or exactly `resize_to` (h, w)), centre
    crop (zero padding where the image is smaller), rescale, normalise -> float32 [H, W, C].

    uint8 pixels (and PIL images) are multiplied by `rescale_factor` (None: left 0-255); float
    arrays are taken as [0, 1] values and are not rescaled again. `channels` (default len(mean),
    else 3) of 1 gives grayscale (ITU-R 601 luma, as PIL's "L"). Float arrays outside
    [-0.5, 1.5] or not finite raise ValueError (`check_float_range`); `source` names the image in
    errors.
    """
    source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else source
    pil = _to_pil(image, source)
    is_float = isinstance(pil, list)
    planes = pil if is_float else [pil]
    width, height = planes[0].size
    if resize_to is not None:
        new_h, new_w = (int(v) for v in resize_to)
    elif short_side is not None:
        new_h, new_w = resized_size(height, width, int(short_side))
    else:
        new_h, new_w = height, width
    if (new_h, new_w) != (height, width):  # an identity resize is skipped (as torchvision)
        planes = [p.resize((new_w, new_h), resample) for p in planes]
    if crop is not None:
        crop_h, crop_w = (int(v) for v in crop)
        top, left = (
            crop_start(new_h, crop_h, crop_rounding),
            crop_start(new_w, crop_w, crop_rounding),
        )
        planes = [p.crop((left, top, left + crop_w, top + crop_h)) for p in planes]  # zero fill
    if is_float:
        x = np.stack([np.asarray(p, dtype=np.float32) for p in planes], axis=-1)
    else:
        x = np.asarray(planes[0], dtype=np.float32)
        if rescale_factor is not None and abs(rescale_factor * 255 - 1) < 1e-12:
            x = x / np.float32(255.0)  # ToTensor (transformers' x * (1/255) in float64: the same)
        elif rescale_factor is not None:
            x = x * np.float32(rescale_factor)
    out_channels = channels if channels is not None else (len(mean) if mean is not None else 3)
    if out_channels == 1:
        x = (x @ np.asarray(GRAY_WEIGHTS, np.float32))[..., None]
    elif out_channels != 3:
        raise ValueError(f"images can be preprocessed to 1 or 3 channels, not {out_channels}")
    if mean is not None and std is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x


def processor_transform(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`transform_image` keywords for an image processor's settings (transformers'
    `preprocessor_config.json`: BitImageProcessor's fields), with transformers' crop rounding."""
    unknown = set(settings) - PROCESSOR_KEYS
    if unknown:
        raise ValueError(
            f"unknown image processor setting(s) {sorted(unknown)}; known: {sorted(PROCESSOR_KEYS)}"
        )
    out: dict[str, Any] = {"crop_rounding": "floor"}
    if settings.get("do_resize", True):
        size = dict(settings.get("size") or {"shortest_edge": 256})
        if set(size) == {"shortest_edge"} and settings.get("default_to_square", False):
            out["resize_to"] = (int(size["shortest_edge"]),) * 2  # transformers' square rule
        elif set(size) == {"shortest_edge"}:
            out["short_side"] = int(size["shortest_edge"])
        elif set(size) == {"height", "width"}:
            out["resize_to"] = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(
                f"size must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {size}"
            )
    if settings.get("do_center_crop", True):
        crop = dict(settings.get("crop_size") or {"height": 224, "width": 224})
        if set(crop) != {"height", "width"}:
            raise ValueError(f"crop_size must be {{'height': h, 'width': w}}, got {crop}")
        out["crop"] = (int(crop["height"]), int(crop["width"]))
    out["resample"] = int(settings.get("resample", Image.BICUBIC))
    out["rescale_factor"] = (
        float(settings.get("rescale_factor", 1 / 255)) if settings.get("do_rescale", True) else None
    )
    mean = tuple(float(v) for v in settings.get("image_mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in settings.get("image_std") or IMAGENET_STD)
    if len(mean) != len(std):
        raise ValueError(f"image_mean {mean} and image_std {std} differ in length")
    if settings.get("do_normalize", True):
        out.update(mean=mean, std=std)
    else:
        out.update(mean=None, std=None, channels=len(mean))
    return out


# The settings of transformers' BitImageProcessor (the `facebook/hiera-*-hf` repos' processor)
# and the bookkeeping keys its preprocessor_config.json files carry.
PROCESSOR_KEYS = frozenset(
    {
        "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
        "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
        "image_processor_type", "processor_class", "_processor_class", "default_to_square",
    }
)  # fmt: skip


def preprocess_image(
    image: Any,
    crop_size: int | Sequence[int] = 224,
    resize_size: int | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    source: str = "image",
) -> np.ndarray:
    """One image (PIL, path, uint8 or [0, 1] float array) -> normalised float32 [H, W, C], by the
    official pipeline: short side to `resize_size` (default 256/224 of the crop), bicubic,
    torchvision's centre crop, ToTensor, Normalize.

    C = len(mean): 3 for the official models; 1 gives grayscale (ITU-R 601 luma, as PIL's "L").
    Float arrays outside [-0.5, 1.5] or not finite raise ValueError (see `check_float_range`);
    `source` names the image in errors.
    """
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    if resize_size is None:
        resize_size = int(RESIZE_RATIO * min(crop_h, crop_w))
    return transform_image(
        image,
        short_side=resize_size,
        crop=(crop_h, crop_w),
        crop_rounding="round",
        mean=mean,
        std=std,
        source=source,
    )


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
