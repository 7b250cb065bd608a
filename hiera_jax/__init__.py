"""hiera-jax: Hiera vision transformers in JAX/Flax, numerically identical to the official code."""

from __future__ import annotations

from typing import Any

from hiera_jax.models.config import HieraConfig, get_config, is_pretraining_name, list_models
from hiera_jax.models.factory import init_params
from hiera_jax.models.hiera import HieraForImageClassification, HieraModel, HieraModelOutput
from hiera_jax.models.mae import HieraForPreTraining
from hiera_jax.weights.convert import convert_state_dict, export_state_dict
from hiera_jax.weights.directory import save_pretrained
from hiera_jax.weights.hub import list_pretrained
from hiera_jax.weights.loading import load_pretrained

__version__ = "0.1.0"


def create_model(name: str, pretrained: bool = False, **overrides: Any):
    """The module for an official variant: classifier for `hiera_*`, MAE for `mae_hiera_*`.

    `pretrained=True` returns `(model, params)` with the published weights instead, exactly as
    `load_pretrained(name, **overrides)` does (any name it takes, e.g. `hiera_tiny_224`,
    `facebook/hiera-tiny-224-in1k-hf` or `hiera_base_224.mae`; `in_chans=`, `source=`,
    `revision=`, `token=` and shape-preserving config overrides are passed on).
    """
    if pretrained:
        return load_pretrained(name, **overrides)
    config = get_config(name, **overrides)
    if is_pretraining_name(name):
        return HieraForPreTraining(config)
    return HieraForImageClassification(config)


__all__ = [
    "HieraConfig",
    "HieraModel",
    "HieraModelOutput",
    "HieraForImageClassification",
    "HieraForPreTraining",
    "list_models",
    "get_config",
    "create_model",
    "init_params",
    "convert_state_dict",
    "export_state_dict",
    "load_pretrained",
    "list_pretrained",
    "save_pretrained",
]
