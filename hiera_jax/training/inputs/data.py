"""Input sources and the official augmentations; the loaders are `pipeline.py` (grain) and
`tfdata.py` (tf.data, optional).

Random-access sources (no TensorFlow): scikit-learn's bundled handwritten digits, moving-digit
clips made from them, a TFDS dataset prepared as ArrayRecord (`tfds.data_source`), and a folder
of class subfolders; `sources.make_source` picks the backend. Nothing is downloaded: a missing dataset
raises with how to prepare it. `Transform` augments one example from the rng it is given, so a
loader that derives that rng from (seed, position) makes every batch reproducible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ============================================================================ sources
class DigitsSource:
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16), upscaled to 32x32 uint8.

    A fixed stratified split (seed 0): 80% train, 20% held-out `test` (also called `validation`).
    """

    num_classes = 10
    class_names = tuple(str(d) for d in range(10))  # the digits themselves
    channels = 1
    size = 32

    def __init__(self, split: str):
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - the train extra installs it
            raise ImportError(
                "the digits dataset ships with scikit-learn: pip install -e '.[train]'"
            ) from err
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        labels = digits.target.astype(np.int32)
        rng = np.random.default_rng(0)
        train_idx, test_idx = [], []
        for cls in range(10):
            idx = np.flatnonzero(labels == cls)
            idx = rng.permutation(idx)
            cut = int(round(len(idx) * 0.8))
            train_idx.extend(idx[:cut])
            test_idx.extend(idx[cut:])
        if split == "train":
            keep = np.sort(np.asarray(train_idx))
        elif split in ("test", "validation", "eval"):
            keep = np.sort(np.asarray(test_idx))
        else:
            raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
        self.labels = labels[keep]
        self.images = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((self.size, self.size), Image.BICUBIC))
                for im in images[keep]
            ]
        )[..., None]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        del rng
        return self.images[index], int(self.labels[index])


class MovingDigitsSource:
    """Clips [T, H, W, 1] of one digit sprite bouncing around a black canvas; label = the digit.

    Trajectories are drawn from the example's rng (new ones every epoch for training) or, with
    rng=None (evaluation), from the index, so held-out clips are fixed.
    """

    num_classes = 10
    class_names = DigitsSource.class_names
    channels = 1

    def __init__(self, split: str, num_frames: int, size: Sequence[int]):
        self.digits = DigitsSource(split)
        self.num_frames = num_frames
        self.height, self.width = size
        self.sprite = max(self.height // 2, 4)

    def __len__(self) -> int:
        return len(self.digits)

    def load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        image, label = self.digits.load(index, None)
        sprite = np.asarray(
            Image.fromarray(image[..., 0]).resize((self.sprite, self.sprite), Image.BICUBIC)
        )
        rng = rng if rng is not None else np.random.default_rng([1234, index])
        span = np.array([self.height - self.sprite, self.width - self.sprite], np.float64)
        pos = rng.uniform(0, 1, 2) * span
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(1.0, 3.0)
        vel = speed * np.array([np.sin(angle), np.cos(angle)])
        clip = np.zeros((self.num_frames, self.height, self.width, 1), np.uint8)
        for t in range(self.num_frames):
            y, x = (int(round(v)) for v in pos)
            clip[t, y : y + self.sprite, x : x + self.sprite, 0] = np.maximum(
                clip[t, y : y + self.sprite, x : x + self.sprite, 0], sprite
            )
            pos = pos + vel
            for d in range(2):  # bounce off the walls
                if pos[d] < 0 or pos[d] > span[d]:
                    vel[d] = -vel[d]
                    pos[d] = np.clip(pos[d], 0, span[d])
        return clip, label


class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow)."""

    def __init__(self, name: str, data_dir: str, split: str, image_key: str, label_key: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError as err:
            raise ImportError(
                "data.source='tfds' needs tensorflow-datasets: pip install -e '.[tfds]'"
            ) from err
        try:
            self.ds = tfds.data_source(name, data_dir=data_dir or None, split=split, download=False)
        except Exception as err:  # DatasetNotFoundError, missing files, TFRecord-only data
            reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise FileNotFoundError(
                f"TFDS dataset {name!r} (split {split!r}) is not prepared as ArrayRecord under "
                f"data_dir={data_dir or '~/tensorflow_datasets'}: {reason}\n"
                "Nothing is downloaded during training. Prepare it once, e.g.\n"
                f"  tfds build {name} --data_dir=DATA_DIR --file_format=array_record\n"
                "(ImageNet needs the manual tar files in DATA_DIR/downloads/manual, see the "
                "tfds catalog). A dataset prepared as TFRecord is read through tf.data with "
                "data.backend='tf' (pip install -e '.[tf]'), or converted once to ArrayRecord "
                "(this step needs TensorFlow): tfds convert_format "
                "--dataset_version_dir=DATA_DIR/NAME/VERSION --out_file_format=array_record"
            ) from err
        self.image_key, self.label_key = image_key, label_key
        feature = self.ds.dataset_info.features[label_key]
        self.num_classes = int(getattr(feature, "num_classes", 0) or 0)
        self.class_names = tuple(getattr(feature, "names", None) or ()) or None
        shape = self.ds.dataset_info.features[image_key].shape
        self.channels = int(shape[-1]) if shape and shape[-1] else 3

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        del rng
        example = self.ds[int(index)]
        return np.asarray(example[self.image_key]), int(example[self.label_key])


class FolderSource:
    """`root/<split>/<class>/<image>` (or `root/<class>/<image>` for the train split), read with PIL."""

    def __init__(
        self, root: str, split: str, channels: int = 3, classes: Sequence[str] | None = None
    ):
        base = os.path.join(root, split)
        if not os.path.isdir(base):
            if split == "train" and os.path.isdir(root):
                base = root
            else:
                raise FileNotFoundError(
                    f"image folder {base} not found: expected {root}/{split}/<class>/<image files>"
                )
        found = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        self.classes = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        self.items = []
        for cls in found:
            if cls not in index:
                raise ValueError(f"class folder {cls!r} in {base} is not a train class")
            folder = os.path.join(base, cls)
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    self.items.append((os.path.join(folder, name), index[cls]))
        if not self.items:
            raise FileNotFoundError(f"no images found under {base}/<class>/")
        self.num_classes = len(self.classes)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
        del rng
        path, label = self.items[int(index)]
        with Image.open(path) as im:
            image = np.asarray(im.convert("L" if self.channels == 1 else "RGB"))
        return (image[..., None] if image.ndim == 2 else image), label


def first_images(source, n: int) -> list[np.ndarray]:
    """The first n images of a split, for the reconstruction pictures."""
    if hasattr(source, "first"):
        return source.first(n)
    return [source.load(i, None)[0] for i in range(n)]


# ============================================================================ augmentations
def random_resized_crop_box(rng, height, width, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height, width, size, crop_pct) -> tuple[int, int, int, int]:
    """Box that `resize(shorter side -> size / crop_pct)` then center-crop `size` selects."""
    scale = min(height, width) / (min(size) / crop_pct)
    h, w = min(height, int(round(size[0] * scale))), min(width, int(round(size[1] * scale)))
    return (height - h) // 2, (width - w) // 2, h, w


def _to_pil(frame: np.ndarray) -> Image.Image:
    return Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(image)
    if out.ndim == 2:
        out = out[..., None]
    return out[..., :channels]


def _crop_resize(frame: np.ndarray, box, size) -> np.ndarray:
    top, left, h, w = box
    image = _to_pil(frame).crop((left, top, left + w, top + h))
    image = image.resize((size[1], size[0]), Image.BICUBIC)
    return _from_pil(image, frame.shape[-1])


# RandAugment ("rand-mM-mstdS-inc1", timm's increasing ops), on PIL images.
_FILL = 128


def _affine(image, matrix):
    return image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_FILL)


def _signed(rng, value):
    return -value if rng.random() < 0.5 else value


def _randaug_ops():
    def enhance(cls):
        return lambda im, m, rng: cls(im).enhance(1.0 + _signed(rng, m * 0.9))

    return {
        "AutoContrast": lambda im, m, rng: ImageOps.autocontrast(im),
        "Equalize": lambda im, m, rng: ImageOps.equalize(im),
        "Invert": lambda im, m, rng: ImageOps.invert(im),
        "Rotate": lambda im, m, rng: im.rotate(
            _signed(rng, 30.0 * m), resample=Image.BILINEAR, fillcolor=_FILL
        ),
        "PosterizeIncreasing": lambda im, m, rng: ImageOps.posterize(im, max(1, 4 - int(4 * m))),
        "SolarizeIncreasing": lambda im, m, rng: ImageOps.solarize(im, 256 - int(256 * m)),
        "SolarizeAdd": lambda im, m, rng: _solarize_add(im, int(110 * m)),
        "ColorIncreasing": enhance(ImageEnhance.Color),
        "ContrastIncreasing": enhance(ImageEnhance.Contrast),
        "BrightnessIncreasing": enhance(ImageEnhance.Brightness),
        "SharpnessIncreasing": enhance(ImageEnhance.Sharpness),
        "ShearX": lambda im, m, rng: _affine(im, (1, _signed(rng, 0.3 * m), 0, 0, 1, 0)),
        "ShearY": lambda im, m, rng: _affine(im, (1, 0, 0, _signed(rng, 0.3 * m), 1, 0)),
        "TranslateXRel": lambda im, m, rng: _affine(
            im, (1, 0, _signed(rng, 0.45 * m) * im.size[0], 0, 1, 0)
        ),
        "TranslateYRel": lambda im, m, rng: _affine(
            im, (1, 0, 0, 0, 1, _signed(rng, 0.45 * m) * im.size[1])
        ),
    }


def _solarize_add(image, add, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    if image.mode == "RGB":
        lut = lut * 3
    return image.point(lut)


RANDAUG_OPS = _randaug_ops()


def parse_randaug(spec: str) -> dict[str, float]:
    """'rand-m9-mstd0.5-inc1' -> {'m': 9, 'mstd': 0.5, 'n': 2}; '' -> {}."""
    if not spec:
        return {}
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaug spec must start with 'rand-', got {spec!r}")
    out = {"m": 9.0, "mstd": 0.0, "n": 2.0}
    for part in parts[1:]:
        for key in ("mstd", "inc", "m", "n"):
            if part.startswith(key):
                out[key] = float(part[len(key) :])
                break
        else:
            raise ValueError(f"unknown randaug option {part!r} in {spec!r}")
    return out


def randaugment(image: Image.Image, rng: np.random.Generator, params: dict) -> Image.Image:
    names = sorted(RANDAUG_OPS)
    for _ in range(int(params["n"])):
        op = names[int(rng.integers(len(names)))]
        if rng.random() > 0.5:  # timm applies each chosen op with prob 0.5
            continue
        m = params["m"]
        if params["mstd"] > 0:
            m = rng.normal(m, params["mstd"])
        m = float(np.clip(m, 0.0, 10.0)) / 10.0
        image = RANDAUG_OPS[op](image, m, rng)
    return image


class Transform:
    """Per-example preprocessing: crop/flip/RandAugment (train) or center crop (eval), normalise."""

    def __init__(self, data_config: Any, input_size: Sequence[int], channels: int, train: bool):
        self.cfg = data_config
        self.video = len(input_size) == 3
        self.size = tuple(input_size[-2:])
        self.num_frames = input_size[0] if self.video else 0
        self.channels = channels
        self.train = train
        self.randaug = parse_randaug(data_config.randaug) if train else {}
        mean = np.asarray(data_config.mean, np.float32)[:channels]
        std = np.asarray(data_config.std, np.float32)[:channels]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"data.mean/std need {channels} entries, got {data_config.mean}")
        self.mean, self.std = mean * 255.0, std * 255.0

    def frames(self, clip: np.ndarray, rng) -> np.ndarray:
        """Pick `num_frames` frames with `frame_stride` (random start for training)."""
        if clip.shape[0] == self.num_frames:
            return clip
        stride = max(1, int(self.cfg.frame_stride))
        span = (self.num_frames - 1) * stride + 1
        if clip.shape[0] < span:
            idx = np.linspace(0, clip.shape[0] - 1, self.num_frames).round().astype(int)
            return clip[idx]
        extra = clip.shape[0] - span
        start = int(rng.integers(0, extra + 1)) if (self.train and rng is not None) else extra // 2
        return clip[start : start + span : stride]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] != self.channels:
            if image.shape[-1] == 1:
                image = np.repeat(image, self.channels, axis=-1)
            elif self.channels == 1:
                image = image.mean(axis=-1, keepdims=True).astype(np.uint8)
        frames = self.frames(image, rng) if self.video else image[None]
        height, width = frames.shape[1:3]
        if self.train:
            box = random_resized_crop_box(
                rng, height, width, self.cfg.crop_scale, self.cfg.crop_ratio
            )
            flip = bool(self.cfg.flip) and rng.random() < 0.5
        else:
            box = center_crop_box(height, width, self.size, self.cfg.crop_pct)
            flip = False
        out = []
        aug_seed = int(rng.integers(2**31)) if self.randaug else 0
        for frame in frames:
            if box != (0, 0, height, width) or (height, width) != self.size:
                frame = _crop_resize(frame, box, self.size)
            if flip:
                frame = frame[:, ::-1]
            if self.randaug:  # the same ops and magnitudes on every frame of a clip
                frame = _from_pil(
                    randaugment(_to_pil(frame), np.random.default_rng(aug_seed), self.randaug),
                    self.channels,
                )
            out.append(frame)
        x = (np.stack(out).astype(np.float32) - self.mean) / self.std
        if self.train and self.cfg.reprob > 0:
            x = random_erasing(x, rng, self.cfg.reprob)
        return x if self.video else x[0]


def random_erasing(x: np.ndarray, rng, prob: float) -> np.ndarray:
    """timm RandomErasing, mode 'pixel', one box of 2-33% area; x [(T,) H, W, C] normalised."""
    if rng.random() >= prob:
        return x
    height, width = x.shape[-3:-1]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            x = x.copy()
            patch = x[..., top : top + h, left : left + w, :]
            x[..., top : top + h, left : left + w, :] = rng.standard_normal(patch.shape)
            return x
    return x


def mix_batch(images, labels_onehot, rng, cfg) -> tuple[np.ndarray, np.ndarray]:
    """timm Mixup (mode 'batch'): mixup or cutmix with the reversed batch; soft labels."""
    use_mixup, use_cutmix = cfg.mixup > 0, cfg.cutmix > 0
    if not (use_mixup or use_cutmix) or rng.random() >= cfg.mixup_prob:
        return images, labels_onehot
    cutmix = use_cutmix and (not use_mixup or rng.random() < cfg.mixup_switch_prob)
    lam = float(rng.beta(cfg.cutmix, cfg.cutmix) if cutmix else rng.beta(cfg.mixup, cfg.mixup))
    flipped = images[::-1]
    if cutmix:
        height, width = images.shape[-3:-1]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, height)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, width)
        images = images.copy()
        images[..., y0:y1, x0:x1, :] = flipped[..., y0:y1, x0:x1, :]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        images = images * lam + flipped * (1.0 - lam)
    labels = labels_onehot * lam + labels_onehot[::-1] * (1.0 - lam)
    return images.astype(np.float32), labels.astype(np.float32)
