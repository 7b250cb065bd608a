"""Building a model by type, and its parameters: real (random init) or shapes only."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiera_jax.models.backbone import HieraBackbone
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.hiera import HieraForImageClassification, HieraModel
from hiera_jax.models.mae import HieraForPreTraining
from hiera_jax.models.variants import is_pretraining_name

# What a checkpoint holds: a classifier, an MAE (with decoder), the encoder alone (HieraModel), or
# the encoder with per-stage norms for feature maps (HieraBackbone, transformers' AutoBackbone).
MODEL_TYPES = ("classification", "pretraining", "backbone", "feature_backbone")
MODULES = {
    "classification": HieraForImageClassification,
    "pretraining": HieraForPreTraining,
    "backbone": HieraModel,
    "feature_backbone": HieraBackbone,
}


def model_type_for(name_or_config: str | HieraConfig, model_type: str | None) -> str:
    """`model_type` if given (checked), else "pretraining" for `mae_*` names, else "classification"."""
    if model_type is not None:
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        return model_type
    if isinstance(name_or_config, str) and is_pretraining_name(name_or_config):
        return "pretraining"
    return "classification"


def build_model(config: HieraConfig, model_type: str) -> nn.Module:
    """The Flax module of `model_type` for `config`."""
    if model_type not in MODULES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    return MODULES[model_type](config)


def init_params(model: nn.Module, key: jax.Array, batch: int = 1) -> dict:
    """Initialise parameters with a dummy input of the model's configured shape.

    The forward pass is traced but dropped (only parameters come out), so the compiled program is
    the initialisers' random draws: on the CPU it is compiled without the backend's optimisation
    passes, which take a third of its compile time and buy nothing for a program run once.
    """
    cfg = model.config
    x = jnp.zeros((batch, *cfg.input_size, cfg.in_chans), jnp.float32)
    init = jax.jit(lambda k: model.init({"params": k, "mask": k, "dropout": k}, x)["params"])
    if jax.default_backend() != "cpu" or isinstance(key, jax.core.Tracer):
        return init(key)
    compiled = init.lower(key).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(key)


def abstract_params(config: HieraConfig, model_type: str) -> dict:
    """Shapes of the Flax parameters of a model, without allocating them (a tree of
    `jax.ShapeDtypeStruct`; traced once per config and type, as loading and saving check them)."""
    return _abstract_params(config, model_type)


@functools.lru_cache(maxsize=64)
def _abstract_params(config: HieraConfig, model_type: str) -> dict:
    model = build_model(config, model_type)
    return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))
