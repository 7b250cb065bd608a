"""Inference: the official preprocessing, a batched jitted Predictor, and the command line.

from hiera_jax import inference
predictor = inference.Predictor.from_pretrained("facebook/hiera-tiny-224-in1k-hf")
print(predictor.top_k(["cat.jpg"], k=5))
"""

from hiera_jax.inference.export import export_model, load_exported
from hiera_jax.inference.predictor import Predictor, check_top_k, predict
from hiera_jax.inference.preprocess import (
    FLOAT_IMAGE_RANGE,
    GRAY_WEIGHTS,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZE_RATIO,
    VIDEO_TEMPORAL_STRIDE,
    check_float_range,
    class_names,
    clip_indices,
    load_image,
    load_video,
    preprocess_image,
    preprocess_video,
    resized_size,
)

__all__ = [
    "export_model",
    "load_exported",
    "FLOAT_IMAGE_RANGE",
    "GRAY_WEIGHTS",
    "IMAGE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_RATIO",
    "VIDEO_TEMPORAL_STRIDE",
    "Predictor",
    "check_float_range",
    "check_top_k",
    "class_names",
    "clip_indices",
    "load_image",
    "load_video",
    "predict",
    "preprocess_image",
    "preprocess_video",
    "resized_size",
]
