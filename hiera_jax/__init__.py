"""hiera-jax: Hiera vision transformers in JAX/Flax, numerically identical to the official code.

The public names are those of the Hugging Face Hiera docs page (`HieraConfig`, `HieraModel`,
`HieraForImageClassification`, `HieraForPreTraining`, `HieraBackbone`, `HieraImageProcessor`),
called as transformers calls them; each also works as its Flax module (`model.apply`).
"""

from __future__ import annotations

from typing import Any

from hiera_jax import families
from hiera_jax.hf import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    BatchFeature,
    HieraBackbone,
    HieraForImageClassification,
    HieraForPreTraining,
    HieraImageProcessor,
    HieraModel,
    HieraPreTrainedModel,
    load_pretrained,
)
from hiera_jax.hf.modeling import CLASSES
from hiera_jax.inference.export import export_model, load_exported
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.factory import init_params
from hiera_jax.models.outputs import (
    BackboneOutput,
    HieraForImageClassificationOutput,
    HieraForPreTrainingOutput,
    HieraModelOutput,
)
from hiera_jax.models.variants import get_config, is_pretraining_name, list_models
from hiera_jax.weights.convert import convert_state_dict, export_state_dict
from hiera_jax.weights.directory import save_pretrained
from hiera_jax.weights.hub import list_pretrained
from hiera_jax.weights.loading import pretrained_config

__version__ = "0.1.0"


def create_model(name: str, pretrained: bool = False, **overrides: Any):
    """The model of an official variant: a classifier for `hiera_*`, the MAE for `mae_hiera_*`.

    `pretrained=True` returns `(model, params)` with the published weights instead, exactly as
    `load_pretrained(name, **overrides)` does (any name it takes, e.g. `hiera_tiny_224`,
    `facebook/hiera-tiny-224-in1k-hf` or `hiera_base_224.mae`; `in_chans=`, `source=`,
    `revision=`, `token=` and config overrides are passed on).

    SAM 2's names (`sam2_hiera_tiny`, `_small`, `_base_plus`, `_large`) give its family's Flax
    module, not a transformers-style class (transformers has none for it): the `HieraDet` trunk,
    or with `num_classes=N` timm's classifier (`HieraDetForImageClassification`, as
    `timm.create_model(name, num_classes=N)`); `HieraDetConfig` fields are the overrides.
    """
    if pretrained:
        return load_pretrained(name, **overrides)
    family = families.for_name(name)
    if not family.transformers_classes:
        return family.create(name, **overrides)
    config = get_config(name, **overrides)
    return CLASSES["pretraining" if is_pretraining_name(name) else "classification"](config)


def _register() -> None:
    from hiera_jax.models import config as config_lib

    config_lib.register_pretrained_reader(pretrained_config)


_register()

__all__ = [
    "export_model",
    "load_exported",
    "AutoBackbone",
    "AutoConfig",
    "AutoImageProcessor",
    "AutoModel",
    "AutoModelForImageClassification",
    "AutoModelForPreTraining",
    "BackboneOutput",
    "BatchFeature",
    "HieraBackbone",
    "HieraConfig",
    "HieraForImageClassification",
    "HieraForImageClassificationOutput",
    "HieraForPreTraining",
    "HieraForPreTrainingOutput",
    "HieraImageProcessor",
    "HieraModel",
    "HieraModelOutput",
    "HieraPreTrainedModel",
    "convert_state_dict",
    "create_model",
    "export_state_dict",
    "get_config",
    "init_params",
    "list_models",
    "list_pretrained",
    "load_pretrained",
    "save_pretrained",
]
