"""Hiera's family record: the official image and video models, their MAE, and abs-win Hiera (a
Hiera config with `abs_win_pos_embed`, the encoder SAM 2's HieraDet starts from)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from hiera_jax.families import Family, Loaded, model_path
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.factory import build_model, init_params
from hiera_jax.models.hiera import HieraEncoder, HieraForImageClassification
from hiera_jax.models.mae import HieraForPreTraining
from hiera_jax.models.variants import get_config, is_pretraining_name, list_models
from hiera_jax.weights import hub
from hiera_jax.weights.directory import save_pretrained
from hiera_jax.weights.loading import load_model, load_pretrained


class Features(HieraEncoder):
    """The encoder alone: per-stage maps from any checkpoint (classifier, backbone or MAE)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        _, maps = self.encode(x, None, train=False, return_intermediates=True)
        return tuple(maps)


def _is_source(name_or_path: Any) -> bool:
    return os.fspath(name_or_path) in hub.PRETRAINED


def _create(name: str, **overrides: Any) -> nn.Module:
    """A classifier for `hiera_*`, the MAE for `mae_hiera_*` (Flax modules)."""
    config = get_config(name, **overrides)
    return build_model(config, "pretraining" if is_pretraining_name(name) else "classification")


def _load_for_inference(directory: str, **overrides: Any) -> Loaded:
    hub_args = {k: overrides.pop(k) for k in ("source", "revision", "token") if k in overrides}
    directory = hub.resolve_pretrained(directory, **hub_args)
    config, model_type, params, checkpoint = load_model(directory, **overrides)
    # Normalised as the model was trained (its processor, or train.py's data statistics).
    settings = checkpoint.preprocessing or {}
    return Loaded(
        config,
        params,
        model_type,
        source=directory,
        mean=tuple(settings["image_mean"]) if settings.get("image_mean") else None,
        std=tuple(settings["image_std"]) if settings.get("image_std") else None,
        preprocessing=settings if settings.get("image_processor_type") else None,
    )


def _random_for_inference(name: str, seed: int = 0, **overrides: Any) -> Loaded:
    config = get_config(name, **overrides)
    model_type = "pretraining" if is_pretraining_name(name) else "classification"
    params = init_params(build_model(config, model_type), jax.random.key(seed))
    return Loaded(config, params, model_type, source=f"random {name}")


def _features(config: HieraConfig, neck: Any = None):
    features = Features(config)
    return lambda p, x: features.apply({"params": p}, x)


def _training_config(name: str | None, kwargs: dict[str, Any]) -> HieraConfig:
    known = {f.name for f in dataclasses.fields(HieraConfig)} | {"head_mul"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"--config.model.{unknown[0]} is not an option of Hiera ({name or 'HieraConfig'}) "
            "(it is a HieraDet option: model.name sam2_hiera_*)"
        )
    if name:
        return get_config(name, **kwargs)
    return HieraConfig(**kwargs)


def _training_model(config: HieraConfig, task: str) -> nn.Module:
    if task == "mae":
        return HieraForPreTraining(config)
    if task == "classification":
        return HieraForImageClassification(config)
    raise ValueError(f"config.task must be 'mae' or 'classification', got {task!r}")


def _encoder_params(text: str) -> tuple[dict, str]:
    """A Hiera model directory, a finished workdir holding `model/`, or any name the hub takes."""
    directory = model_path(os.path.abspath(hub.resolve_pretrained(text)))
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(
            f"init_from={directory} is neither a model directory (config.json + "
            "model.safetensors, from save_pretrained or hiera-jax-convert), a finished "
            "training workdir holding model/ (it is written when a run ends), nor a pretrained name"
        )
    _, params = load_pretrained(directory)
    return flax.traverse_util.flatten_dict(jax.device_get(params), sep="/"), directory


def _export(
    directory: str,
    params: Any,
    config: HieraConfig,
    *,
    task: str,
    mean,
    std,
    crop_pct: float = 224 / 256,
    class_names: tuple[str, ...] | None = None,
    **_: Any,
) -> str:
    """save_pretrained's directory (transformers' layout), preprocessed as the run evaluated:
    its normalisation, the short side resized to size / crop_pct, the centre crop; a classifier
    named by the data's classes (`id2label`) where the config names none."""
    short = int(round(min(config.input_size[-2:]) / float(crop_pct)))
    if task != "mae" and class_names and config.class_names is None:
        if len(class_names) == config.num_classes:
            config = config.replace(class_names=tuple(class_names))
    return save_pretrained(
        directory,
        params,
        config,
        model_type="pretraining" if task == "mae" else "classification",
        preprocessing={"mean": mean, "std": std, "resize_size": short},
    )


FAMILY = Family(
    name="hiera",
    title="Hiera",
    config_type=HieraConfig,
    variants=list_models,
    get_config=get_config,
    is_source=_is_source,
    create=_create,
    load=load_pretrained,
    load_for_inference=_load_for_inference,
    random_for_inference=_random_for_inference,
    features=_features,
    classifier=HieraForImageClassification,
    training_config=_training_config,
    training_model=_training_model,
    encoder_params=_encoder_params,
    export=_export,
    scannable=True,
    transformers_classes=True,
)
