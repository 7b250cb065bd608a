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
    """

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
        """Load a `save_pretrained` / converter / train.py directory, or any name
        `hiera_jax.load_pretrained` takes (hub names, repo ids); overrides: `input_size`, `dtype`..."""
        from hiera_jax import hub

        hub_args = {k: overrides.pop(k) for k in ("source", "revision", "token") if k in overrides}
        directory = hub.resolve_pretrained(directory, **hub_args)
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
    def _check_sequence(self, inputs: Any) -> None:
        """ValueError when `inputs` is one image (or clip) rather than a sequence of them."""
        kind = "clip" if self.config.is_video else "image"
        if isinstance(inputs, (str, os.PathLike, Image.Image)):
            raise ValueError(
                f"expected a sequence of inputs, got one {type(inputs).__name__}; for one {kind} "
                f"pass [{kind}]"
            )
        if hasattr(inputs, "ndim"):  # an array: a batch along its first axis
            one = 4 if self.config.is_video else 3  # [T, H, W, C] / [H, W, C]
            if inputs.ndim < one or (inputs.ndim == one and inputs.shape[-1] in (1, 3, 4)):
                layout = "[B, T, H, W, C]" if self.config.is_video else "[B, H, W, C]"
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
        """Per-stage maps `stage{i}`: [B, (T), H, W, C] in spatial order, channels-last."""
        batch = self._check_preprocessed(inputs) if preprocessed else self.preprocess(inputs)
        maps = self._run(self._maps, batch)
        return {f"stage{i + 1}": m for i, m in enumerate(maps)}


def check_top_k(k: Any) -> None:
    """ValueError unless `k` is a positive integer (0 would print nothing, -1 almost everything)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (top-k) must be a positive integer, got {k!r}")


def predict(
    model: nn.Module, params: Any, images: Iterable[Any], batch_size: int = 8
) -> np.ndarray:
    """Probabilities of a classifier `model` for images (or clips) of any size."""
    return Predictor(model.config, params, batch_size=batch_size).predict(images)
