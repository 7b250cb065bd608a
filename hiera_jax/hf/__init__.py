"""The Hugging Face-style API: transformers' Hiera classes and image processor, in JAX."""

from hiera_jax.hf.modeling import (
    CLASSES,
    HieraBackbone,
    HieraForImageClassification,
    HieraForPreTraining,
    HieraModel,
    HieraPreTrainedModel,
    load_pretrained,
)
from hiera_jax.hf.processing import BatchFeature, HieraImageProcessor
from hiera_jax.models.config import HieraConfig

# transformers' Auto classes, for code written against them: Hiera is the only model here.
AutoConfig = HieraConfig
AutoImageProcessor = HieraImageProcessor
AutoModel = HieraModel
AutoModelForImageClassification = HieraForImageClassification
AutoModelForPreTraining = HieraForPreTraining
AutoBackbone = HieraBackbone

__all__ = [
    "AutoBackbone",
    "AutoConfig",
    "AutoImageProcessor",
    "AutoModel",
    "AutoModelForImageClassification",
    "AutoModelForPreTraining",
    "CLASSES",
    "BatchFeature",
    "HieraBackbone",
    "HieraForImageClassification",
    "HieraForPreTraining",
    "HieraImageProcessor",
    "HieraModel",
    "HieraPreTrainedModel",
    "load_pretrained",
]
