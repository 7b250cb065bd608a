"""Hiera in Flax NNX: each model class, and SAM 2's image encoder, as an `nnx.Module` that holds
its weights.

Our modules are Linen; these classes wrap them with `flax.nnx.bridge.ToNNX`, so the parameters
become `nnx.Param`s laid out as the Linen tree (`model.linen.blocks_0.attn.qkv.kernel`), and
`nnx.split` / `nnx.merge`, `nnx.jit`, `nnx.grad` and `nnx.Optimizer` work on them as on any NNX
model. A Hiera backbone goes into an NNX model as a submodule:

    from flax import nnx
    import hiera_jax.nnx

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.backbone = hiera_jax.nnx.HieraModel.from_pretrained("hiera_tiny_224")
            self.head = nnx.Linear(768, 10, rngs=rngs)

        def __call__(self, x):                      # x: [B, H, W, C], normalised
            return self.head(self.backbone(x).pooler_output)

The call is the Linen module's: channels-last pixels, its outputs (the classifier's logits,
`HieraModel`'s `HieraModelOutput`, the MAE's loss tuple, SAM 2's encoder dict), and its keyword
arguments (`train=True` for dropout and drop path, `output_hidden_states=True`, ...). The
random streams a call needs (dropout, the MAE's mask) come from the model's `nnx.Rngs`.
`linen_params()` gives the Linen tree back, and `save_pretrained` writes transformers' format.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from hiera_jax import families
from hiera_jax.families.hieradet import Features
from hiera_jax.hf import modeling
from hiera_jax.models.config import HieraConfig

__all__ = [
    "HieraBackbone",
    "HieraForImageClassification",
    "HieraForPreTraining",
    "HieraModel",
    "SAM2ImageEncoder",
]


class _LinenModel(nnx.Module):
    """A Linen model with its parameters as `nnx.Param`s (module docstring): `self.linen` is
    the `bridge.ToNNX` wrapper, beside the model's (static) config."""

    def __init__(self, module: Any, sample: jax.Array, params: Any, rngs: nnx.Rngs | None):
        if rngs is None:  # a stream per randomness the models draw: init, dropout, MAE's mask
            rngs = nnx.Rngs(0, dropout=1, mask=2)
        self.linen = bridge.ToNNX(module, rngs=rngs)
        bridge.lazy_init(self.linen, sample)
        if params is not None:
            self.load_linen_params(params)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The Linen module's call (module docstring)."""
        return self.linen(*args, **kwargs)

    def linen_params(self) -> dict:
        """The parameters as the Linen module takes them (`module.apply({"params": ...})`)."""
        return nnx.to_pure_dict(nnx.state(self.linen, nnx.Param))

    def load_linen_params(self, params: Any) -> None:
        """Set every parameter from a Linen tree of the same structure and shapes."""
        state = nnx.state(self.linen, nnx.Param)
        ours = jax.tree.map(jnp.shape, nnx.to_pure_dict(state))
        theirs = jax.tree.map(jnp.shape, params)
        if ours != theirs:
            raise ValueError(
                f"{type(self).__name__}: the parameters do not fit this model (another config "
                "or model class?)"
            )
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
        nnx.update(self.linen, state)


class _HieraNNX(_LinenModel):
    """One of the transformers-named Hiera classes, in NNX."""

    hf_class: ClassVar[type[modeling.HieraPreTrainedModel]]

    def __init__(
        self,
        config: HieraConfig | None = None,
        *,
        params: Any = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        """A model of `config` (transformers' defaults if None): random weights drawn from
        `rngs`, or `params` (a Linen tree, as `hiera_jax`'s classes hold)."""
        wrapper = self.hf_class(config)  # validates the config and builds the Linen module
        self.config = wrapper.config  # a sealed copy, as every hiera_jax model keeps
        sample = jnp.zeros((1, *self.config.input_size, self.config.in_chans), jnp.float32)
        super().__init__(wrapper.module, sample, params, rngs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, rngs: nnx.Rngs | None = None, **kwargs: Any):
        """Any name `hiera_jax`'s `from_pretrained` takes (hub ids, our and timm names,
        directories, `.pth` files), with its keyword arguments (`num_labels=10`, ...)."""
        loaded = cls.hf_class.from_pretrained(name_or_path, **kwargs)
        return cls(loaded.config, params=loaded.params, rngs=rngs)

    def to_hiera_jax(self) -> modeling.HieraPreTrainedModel:
        """The Hugging Face-style model of these weights (for its calls, processor, saving)."""
        return self.hf_class(self.config, params=self.linen_params())

    def save_pretrained(self, directory: str, **kwargs: Any) -> str:
        """transformers' `config.json` and `model.safetensors`, as `hiera_jax`'s classes write."""
        return self.to_hiera_jax().save_pretrained(directory, **kwargs)


class HieraModel(_HieraNNX):
    """The encoder: `HieraModelOutput` (last_hidden_state, pooler_output, ...)."""

    hf_class = modeling.HieraModel


class HieraForImageClassification(_HieraNNX):
    """The classifier: logits [B, num_labels]."""

    hf_class = modeling.HieraForImageClassification


class HieraForPreTraining(_HieraNNX):
    """The MAE: `(loss, pred, label, mask)`; its mask is drawn from the `mask` stream of the
    model's `nnx.Rngs` (give `rngs=nnx.Rngs(0, mask=1)`), or given as `noise=`."""

    hf_class = modeling.HieraForPreTraining


class HieraBackbone(_HieraNNX):
    """Per-stage maps of the config's `out_features`."""

    hf_class = modeling.HieraBackbone


class SAM2ImageEncoder(_LinenModel):
    """SAM 2's image encoder (HieraDet trunk + FPN neck): a dict of `vision_features`,
    `backbone_fpn{i}`, `vision_pos_enc{i}` and the trunk's `stage{i}` maps, NHWC."""

    def __init__(self, config: Any, neck: Any, *, params: Any = None, rngs=None) -> None:
        self.config, self.neck = config, neck
        module = Features(config, neck)  # the trunk's maps and ImageEncoder's outputs
        sample = jnp.zeros((1, *config.input_size, config.in_chans), jnp.float32)
        super().__init__(module, sample, params, rngs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, rngs: nnx.Rngs | None = None, **kwargs: Any):
        """SAM 2 / SAM 2.1 checkpoints by name, repo id or file (`hiera_jax.load_hieradet`'s
        sources) that hold the neck; `input_size=` and the like as there."""
        loaded = families.get("hieradet").load_for_inference(name_or_path, **kwargs)
        if loaded.neck is None:
            raise ValueError(
                f"{name_or_path} holds SAM 2's trunk without its FPN neck: no image encoder"
            )
        return cls(loaded.config, loaded.neck, params=loaded.params, rngs=rngs)

    @classmethod
    def random(cls, name: str, *, seed: int = 0, **overrides: Any) -> SAM2ImageEncoder:
        """A randomly initialised SAM 2 encoder (`sam2_hiera_tiny`, ...): for tests and demos."""
        loaded = families.get("hieradet").random_for_inference(name, seed, **overrides)
        return cls(loaded.config, loaded.neck, params=loaded.params)
