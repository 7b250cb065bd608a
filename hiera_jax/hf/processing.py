"""`HieraImageProcessor`: transformers' image processor for Hiera, returning NumPy or JAX arrays.

The `facebook/hiera-*-hf` repos configure transformers' `BitImageProcessor`: the short side to 256
(bicubic), a centre 224 crop, rescale by 1/255, ImageNet mean/std, channels-first. This class reads
and writes the same `preprocessor_config.json` and runs the same steps on PIL, through the code
the Predictor uses (`hiera_jax.inference.preprocess.transform_image`, with transformers' crop
rounding), so its pixels are those of transformers' processor:

    processor = HieraImageProcessor.from_pretrained("facebook/hiera-tiny-224-hf")
    inputs = processor(images=image, return_tensors="np")   # {"pixel_values": [1, 3, 224, 224]}
    outputs = model(**inputs)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from hiera_jax.inference import preprocess
from hiera_jax.weights import directory as directory_lib
from hiera_jax.weights import hub

RETURN_TENSORS = (None, "np", "jax")


class BatchFeature(dict):
    """transformers' `BatchFeature`: the processor's dict, whose keys also read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class HieraImageProcessor:
    """Resize, centre crop, rescale and normalise images into `pixel_values` (NCHW floats).

    The arguments are BitImageProcessor's; the defaults are the Hiera repos' settings. Images are
    PIL images, paths, or arrays (uint8 0-255, or floats in [0, 1]; [H, W, C] or [C, H, W] as
    transformers infers it), one or a list. Float arrays are taken as already rescaled (transformers
    would divide them by 255 a second time).
    """

    model_input_names = ("pixel_values",)

    def __init__(
        self,
        do_resize: bool = True,
        size: Mapping[str, int] | None = None,
        resample: int = Image.BICUBIC,
        do_center_crop: bool = True,
        crop_size: Mapping[str, int] | int | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(crop_size, int):
            crop_size = {"height": crop_size, "width": crop_size}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        self.settings: dict[str, Any] = {
            "do_resize": bool(do_resize),
            "size": dict(size) if size is not None else {"shortest_edge": 256},
            "resample": int(resample),
            "do_center_crop": bool(do_center_crop),
            "crop_size": dict(crop_size)
            if crop_size is not None
            else {"height": 224, "width": 224},
            "do_rescale": bool(do_rescale),
            "rescale_factor": float(rescale_factor),
            "do_normalize": bool(do_normalize),
            "image_mean": [float(v) for v in (image_mean or preprocess.IMAGENET_MEAN)],
            "image_std": [float(v) for v in (image_std or preprocess.IMAGENET_STD)],
            "do_convert_rgb": bool(do_convert_rgb),
        }
        for key, value in kwargs.items():  # bookkeeping keys of preprocessor_config.json
            if key not in preprocess.PROCESSOR_KEYS:
                raise ValueError(
                    f"unknown HieraImageProcessor argument {key!r}; known: "
                    f"{', '.join(sorted(self.settings))}"
                )
            if key == "default_to_square":
                self.settings[key] = bool(value)
        self._transform = preprocess.processor_transform(self.settings)  # checks the values

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"HieraImageProcessor({json.dumps(self.settings)})"

    # ------------------------------------------------------------------ calling
    def __call__(
        self, images: Any, return_tensors: str | None = None, **kwargs: Any
    ) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = None,
        *,
        data_format: str = "channels_first",
        **overrides: Any,
    ) -> BatchFeature:
        """`{"pixel_values": ...}`: one [C, H, W] array per image (a list) with
        `return_tensors=None`, a stacked NumPy ("np") or JAX ("jax") array [B, C, H, W] otherwise.
        `overrides` change settings for this call (`do_resize=False`, `size={...}`...)."""
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(
                f"return_tensors must be 'np', 'jax' or None (hiera_jax gives NumPy or JAX "
                f"arrays), got {return_tensors!r}"
            )
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"data_format must be channels_first or channels_last, got {data_format!r}"
            )
        transform = self._transform
        if overrides:
            transform = preprocess.processor_transform({**self.settings, **overrides})
        batch = _image_list(images)
        pixels = []
        for index, image in enumerate(batch):
            x = preprocess.transform_image(
                _channels_last(image), **transform, source=f"image {index}"
            )
            pixels.append(np.moveaxis(x, -1, 0) if data_format == "channels_first" else x)
        if return_tensors is None:
            return BatchFeature(pixel_values=pixels)
        stacked = np.stack(pixels)
        if return_tensors == "jax":
            import jax.numpy as jnp

            stacked = jnp.asarray(stacked)
        return BatchFeature(pixel_values=stacked)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """transformers' preprocessor_config.json (read by its AutoImageProcessor as BitImageProcessor)."""
        return {"image_processor_type": "BitImageProcessor", **self.settings}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> HieraImageProcessor:
        return cls(**{**dict(values), **overrides})

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `preprocessor_config.json` into `save_directory`."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, directory_lib.PREPROCESSOR_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        source: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> HieraImageProcessor:
        """The processor of a model: its `preprocessor_config.json` (a Hugging Face repo id, a
        directory, the file itself, or any name `hiera_jax.load_pretrained` takes). A model
        saved without one (official and timm weights) gets the official pipeline's settings for
        its input size, with its training data's mean/std when train.py stored them."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path) and path.endswith(".json"):
            return cls.from_dict(_read_json(path), **overrides)
        folder = hub.resolve_pretrained(path, source=source, revision=revision, token=token)
        file = os.path.join(folder, directory_lib.PREPROCESSOR_FILE)
        if os.path.isfile(file):
            return cls.from_dict(_read_json(file), **overrides)
        checkpoint_config, _ = directory_lib.read_config(folder)
        meta = _read_json(os.path.join(folder, directory_lib.CONFIG_FILE))
        norm = meta.get("preprocessing") or {}
        mean = norm.get("mean") or (
            preprocess.IMAGENET_MEAN if checkpoint_config.in_chans == 3 else None
        )
        std = norm.get("std") or (
            preprocess.IMAGENET_STD if checkpoint_config.in_chans == 3 else None
        )
        if mean is None or std is None:
            raise ValueError(
                f"{path} has no preprocessor_config.json and takes {checkpoint_config.in_chans} "
                "channels: give image_mean and image_std"
            )
        settings = directory_lib.preprocessor_config(checkpoint_config, mean, std)
        return cls.from_dict(settings, **overrides)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload image processor",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload `preprocessor_config.json` to the Hugging Face repo `repo_id` (created if needed)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return hub.upload_folder(
                tmp,
                repo_id,
                commit_message=commit_message,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )


def _read_json(path: str) -> dict[str, Any]:
    value = directory_lib.read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not an image processor config (a JSON object)")
    return value


def _image_list(images: Any) -> list[Any]:
    """One image or a batch of them -> a list (transformers' `make_list_of_images`)."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (an empty list)")
        return [img.detach().cpu().numpy() if hasattr(img, "detach") else img for img in images]
    array = np.asarray(images)
    if array.ndim == 4:
        if array.shape[0] == 0:
            raise ValueError(f"no images given (a batch of shape {array.shape})")
        return list(array)
    if array.ndim in (2, 3):
        return [array]
    raise ValueError(
        f"images must be PIL images, paths or arrays [H, W, C] / [C, H, W] (or a batch of them), "
        f"got an array of shape {array.shape}"
    )


def _channels_last(image: Any) -> Any:
    """[C, H, W] arrays -> [H, W, C], inferring the channel axis as transformers does (first
    when it holds 1, 3 or 4 values)."""
    if isinstance(image, (Image.Image, str, os.PathLike)):
        return image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    return array
