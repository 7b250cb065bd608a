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

from hiera_jax.inference.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZE_RATIO,
    VIDEO_TEMPORAL_STRIDE,
    class_names,
    load_video,
    preprocess_image,
    preprocess_video,
    processor_transform,
    transform_image,
)
from hiera_jax.models import hieradet, hieradet_neck
from hiera_jax.models.config import HieraConfig, get_config
from hiera_jax.models.factory import build_model, init_params
from hiera_jax.models.hiera import HieraEncoder, HieraForImageClassification
from hiera_jax.models.hieradet import HieraDetConfig
from hiera_jax.models.hieradet_neck import FpnNeckConfig
from hiera_jax.weights import hub
from hiera_jax.weights.loading import load_model


# ---------------------------------------------------------------------- prediction
class _Features(HieraEncoder):
    """The encoder alone: per-stage maps from any checkpoint (classifier, backbone or MAE)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        _, maps = self.encode(x, None, train=False, return_intermediates=True)
        return tuple(maps)


class _HieraDetFeatures(nn.Module):
    """SAM 2's trunk maps and `ImageEncoder`'s outputs (params `trunk`, `neck`), from one trunk
    pass."""

    trunk: HieraDetConfig
    neck: FpnNeckConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        _, maps = hieradet.HieraDet(self.trunk, name="trunk")(x, return_intermediates=True)
        out = {f"stage{i + 1}": m for i, m in enumerate(maps)}
        if self.neck.scalp >= len(maps):
            raise ValueError(f"scalp={self.neck.scalp} drops all {len(maps)} levels")
        neck = hieradet_neck.FpnNeck(self.neck, jnp.dtype(self.trunk.dtype), name="neck")
        fpn, pos = neck(maps)
        if self.neck.scalp > 0:
            fpn, pos = fpn[: -self.neck.scalp], pos[: -self.neck.scalp]
        out["vision_features"] = fpn[-1]
        out.update({f"backbone_fpn{i}": f for i, f in enumerate(fpn)})
        out.update({f"vision_pos_enc{i}": e for i, e in enumerate(pos)})
        return out


def _trunk_params(params: Any) -> Any:
    """A HieraDet classifier's params without its head (the trunk's tree, as HieraDet takes)."""
    return {k: v for k, v in params.items() if k != "head"} if "head" in params else params


@functools.cache
def _jitted_probs(config: HieraConfig | HieraDetConfig):
    """`(params, x) -> softmax(logits)`, jitted once per config."""
    if isinstance(config, HieraDetConfig):
        classifier = hieradet.HieraDetForImageClassification(config)
    else:
        classifier = HieraForImageClassification(config)
    return jax.jit(lambda p, x: jax.nn.softmax(classifier.apply({"params": p}, x), axis=-1))


@functools.cache
def _jitted_maps(config: HieraConfig | HieraDetConfig, neck: FpnNeckConfig | None = None):
    """`(params, x) -> per-stage maps` (a tuple; a dict for HieraDet), jitted once per config."""
    if isinstance(config, HieraDetConfig) and neck is not None:
        encoder = _HieraDetFeatures(config, neck)
        return jax.jit(lambda p, x: encoder.apply({"params": p}, x))
    if isinstance(config, HieraDetConfig):
        trunk = hieradet.HieraDet(config)

        def stage_maps(p, x):
            _, maps = trunk.apply({"params": _trunk_params(p)}, x, return_intermediates=True)
            return {f"stage{i + 1}": m for i, m in enumerate(maps)}

        return jax.jit(stage_maps)
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

    SAM 2's HieraDet (`from_pretrained` of a SAM 2 / timm / transformers name or path, or
    `from_hieradet`): `config` is its HieraDetConfig and `neck` the FPN's where the checkpoint has
    it; `features` then also gives SAM 2's `ImageEncoder` outputs.

    `devices` (default: one device) splits every batch over these devices along a "data" mesh
    axis, the params replicated: each chunk is padded to a multiple of their number, so
    `batch_size` is per step, over all of them.
    """

    def __init__(
        self,
        config: HieraConfig | HieraDetConfig,
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
        neck: FpnNeckConfig | None = None,
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
        self._maps = _jitted_maps(config, neck) if neck is not None else _jitted_maps(config)
        self.mesh = None
        if devices is not None and len(devices) > 1:
            self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            self.params = jax.device_put(params, replicated)

    # construction --------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str, **overrides: Any) -> Predictor:
        """Load a `save_pretrained` / converter / train.py directory, or any name
        `hiera_jax.load_pretrained` takes (hub names, repo ids); overrides: `input_size`, `dtype`,
        `devices`... SAM 2's HieraDet checkpoints go to `from_hieradet`."""
        from hiera_jax.weights.formats import HIERADET_LOADER
        from hiera_jax.weights.hieradet_loading import is_hieradet_source

        if is_hieradet_source(directory):  # SAM 2's HieraDet: names, repos, directories
            overrides.pop("source", None)
            return cls.from_hieradet(directory, **overrides)
        hub_args = {k: overrides.pop(k) for k in ("source", "revision", "token") if k in overrides}
        try:
            resolved = hub.resolve_pretrained(directory, **hub_args)
        except ValueError as e:
            if HIERADET_LOADER not in str(e):
                raise
            return cls.from_hieradet(directory, **overrides, **hub_args)  # a SAM 2 / timm file
        directory = resolved
        batch_size = overrides.pop("batch_size", 8)
        devices = overrides.pop("devices", None)
        config, model_type, params, checkpoint = load_model(directory, **overrides)
        # Normalise as the model was trained (its processor, or train.py's data statistics);
        # ImageNet's for converted official and timm weights.
        settings = checkpoint.preprocessing or {}
        mean = tuple(settings.get("image_mean") or IMAGENET_MEAN)
        std = tuple(settings.get("image_std") or IMAGENET_STD)
        transform = None
        if settings.get("image_processor_type"):
            transform = processor_transform(settings)
            if transform.get("crop") != tuple(config.input_size[-2:]):
                transform = None  # run at another size: the official pipeline for that size
        return cls(
            config,
            params,
            model_type=model_type,
            batch_size=batch_size,
            source=directory,
            mean=mean,
            std=std,
            transform=transform,
            devices=devices,
        )

    @classmethod
    def from_hieradet(
        cls,
        name_or_path: str,
        *,
        encoder: bool | None = None,
        batch_size: int = 8,
        input_size: int | tuple[int, int] | None = None,
        devices: Sequence[jax.Device] | None = None,
        **overrides: Any,
    ) -> Predictor:
        """SAM 2's Hiera from any `hiera_jax.load_hieradet` source: a classifier where the
        checkpoint has timm's head (a HieraDet finetune's `workdir/model`), else the trunk and,
        where the checkpoint has SAM 2's neck (`encoder` None or True), the FPN. Images are
        preprocessed as SAM 2 does (`SAM2Transforms`: resized to the square input, bilinear),
        a classifier's as it was evaluated (short side to size / crop_pct, centre crop);
        normalised with the checkpoint's timm `pretrained_cfg` mean/std, else ImageNet's (SAM 2's
        own)."""
        from hiera_jax.weights.directory import read_json
        from hiera_jax.weights.hieradet_loading import load_hieradet

        module, params = load_hieradet(
            name_or_path,
            encoder=encoder,
            input_size=input_size,
            classifier=None if encoder is None else False,
            revision=overrides.pop("revision", None),
            token=overrides.pop("token", None),
            **{k: v for k, v in overrides.items() if k != "source"},
        )
        pretrained: dict[str, Any] = {}
        meta_path = os.path.join(os.fspath(name_or_path), "config.json")
        if os.path.isfile(meta_path):
            pretrained = (read_json(meta_path) or {}).get("pretrained_cfg") or {}
        mean = tuple(pretrained.get("mean") or IMAGENET_MEAN)
        std = tuple(pretrained.get("std") or IMAGENET_STD)
        if isinstance(module, hieradet_neck.ImageEncoder):
            config, neck, model_type = module.trunk, module.neck, "encoder"
        else:
            config, neck = module.config, None
            classifier = isinstance(module, hieradet.HieraDetForImageClassification)
            model_type = "classification" if classifier else "backbone"
        size = tuple(config.input_size)
        if model_type == "classification":  # as it was evaluated: short side, centre crop
            crop_pct = float(pretrained.get("crop_pct") or 1 / RESIZE_RATIO)
            short = int(min(size) / crop_pct)
            transform = dict(short_side=short, crop=size, mean=mean, std=std)
        else:  # SAM2Transforms: the whole image resized to the square input, bilinear
            transform = dict(resize_to=size, resample=Image.BILINEAR, crop=None, mean=mean, std=std)
        return cls(
            config,
            params,
            model_type=model_type,
            batch_size=batch_size,
            source=os.fspath(name_or_path),
            mean=mean,
            std=std,
            transform=transform,
            neck=neck,
            devices=devices,
        )

    @classmethod
    def random(
        cls, name: str, *, seed: int = 0, batch_size: int = 8, **overrides: Any
    ) -> Predictor:
        """A randomly initialised official variant: for demos and tests, predictions mean nothing.

        SAM 2's names (`sam2_hiera_tiny`, ...) give its image encoder (trunk + FPN neck)."""
        if name in hieradet.VARIANTS:
            devices = overrides.pop("devices", None)
            trunk = hieradet.get_config(name, **overrides)
            encoder = hieradet_neck.ImageEncoder(trunk, FpnNeckConfig())
            x = jnp.zeros((1, *trunk.input_size, trunk.in_chans), jnp.float32)
            params = jax.jit(encoder.init)(jax.random.key(seed), x)["params"]
            return cls(
                trunk,
                params,
                model_type="encoder",
                batch_size=batch_size,
                source=f"random {name}",
                neck=FpnNeckConfig(),
                devices=devices,
            )
        devices = overrides.pop("devices", None)
        config = get_config(name, **overrides)
        model_type = "pretraining" if name.startswith("mae_") else "classification"
        params = init_params(build_model(config, model_type), jax.random.key(seed))
        return cls(
            config,
            params,
            model_type=model_type,
            batch_size=batch_size,
            source=f"random {name}",
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


def check_top_k(k: Any) -> None:
    """ValueError unless `k` is a positive integer (0 would print nothing, -1 almost everything)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (top-k) must be a positive integer, got {k!r}")


def predict(
    model: nn.Module, params: Any, images: Iterable[Any], batch_size: int = 8
) -> np.ndarray:
    """Probabilities of a classifier `model` for images (or clips) of any size."""
    return Predictor(model.config, params, batch_size=batch_size).predict(images)
