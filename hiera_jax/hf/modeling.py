"""The Hugging Face-style classes: a config, its parameters and the Flax module, called as
transformers calls its Hiera models.

This is the split transformers' own Flax models used (`FlaxViTModel` over `FlaxViTModule`): the
linen modules of `hiera_jax.models` hold the math and stay pure (training and `apply` use them);
these classes hold `config` and `params`, load, save and push, and are called as the Hugging Face
docs page calls Hiera:

    model = HieraForImageClassification.from_pretrained("facebook/hiera-tiny-224-in1k-hf")
    outputs = model(**processor(images=image, return_tensors="np"))  # pixel_values, NCHW
    outputs.logits.argmax(-1), model.config.id2label

A call runs one jitted function per set of static options (which outputs, training or not) and
input shape, so calling again with the same options does not trace again. `params=` runs other
parameters (e.g. inside `jax.grad`), `train=True` with `dropout_rng=` enables stochastic depth
and dropout, and `apply` / `init` are the module's, so code written for the modules keeps
working on these objects.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiera_jax import families
from hiera_jax.models import backbone as backbone_lib
from hiera_jax.models import hiera as hiera_lib
from hiera_jax.models import mae as mae_lib
from hiera_jax.models import masking
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.factory import abstract_params, init_params
from hiera_jax.models.outputs import (
    BackboneOutput,
    HieraForImageClassificationOutput,
    HieraForPreTrainingOutput,
    HieraModelOutput,
)
from hiera_jax.weights import convert as convert_lib
from hiera_jax.weights import directory as directory_lib
from hiera_jax.weights import hub, loading


@dataclasses.dataclass(frozen=True)
class _Call:
    """A call's static options: they key its compiled function, whose body reads them (so the
    pixels are not kept here: the compiled function would hold on to the first batch)."""

    channels_first: bool
    attentions: bool
    hidden: bool
    interpolate: bool
    as_dict: bool
    train: bool

    def options(self) -> tuple:
        return (self.channels_first, self.attentions, self.hidden, self.interpolate, self.train)

    def channels_last(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.moveaxis(x, 1, -1) if self.channels_first else x

    def module_kwargs(self) -> dict[str, Any]:
        """The options as the modules take them."""
        return dict(
            train=self.train,
            output_hidden_states=self.hidden,
            output_attentions=self.attentions,
            interpolate_pos_encoding=self.interpolate,
        )


# Jitted forwards by (class, module, options), least recently used first (`_forward`).
_SHARED_FORWARDS: dict[tuple, Any] = {}
_SHARED_FORWARDS_SIZE = 64


def _rngs(dropout_key: jax.Array | None, **others: jax.Array | None) -> dict[str, jax.Array]:
    rngs = {"dropout": dropout_key, **others}
    return {name: key for name, key in rngs.items() if key is not None}


class HieraPreTrainedModel:
    """The base of the Hugging Face-style classes: config, params, module, load/save/push."""

    model_type: ClassVar[str] = ""  # hiera_jax.models.factory.MODEL_TYPES
    main_input_name: ClassVar[str] = "pixel_values"
    base_model_prefix: ClassVar[str] = "hiera"
    config_class: ClassVar[type] = HieraConfig
    _init_args: ClassVar[tuple[str, ...]] = ()  # constructor options from_pretrained forwards

    def __init__(
        self, config: HieraConfig | None = None, *, params: Any = None, seed: int = 0
    ) -> None:
        if config is None:
            config = HieraConfig()
        if not isinstance(config, HieraConfig):
            raise TypeError(
                f"{type(self).__name__} takes a hiera_jax.HieraConfig, got {type(config).__name__}"
                " (build one with HieraConfig(**kwargs) or HieraConfig.from_pretrained(...))"
            )
        self.config = config.frozen()  # a later change to the caller's config stays theirs
        self.module = self._build_module(self.config)
        self.seed = seed
        self._rng = jax.random.key(seed + 1)  # mask noise / dropout when a call gives none
        self._params = None if params is None else self._checked(params)

    # ------------------------------------------------------------------ module and params
    def _build_module(self, config: HieraConfig) -> nn.Module:
        raise NotImplementedError

    @property
    def params(self) -> dict:
        """The parameters (random ones from `seed`, made on first use, if none were given)."""
        if self._params is None:
            self._params = self.init_weights(jax.random.key(self.seed))
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        self._params = self._checked(params)

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, ...] | None = None) -> dict:
        """Fresh parameters from `rng` (the module's initialisers)."""
        del input_shape  # the config fixes the shapes
        return init_params(self.module, rng)

    def _checked(self, params: Any) -> dict:
        if isinstance(params, Mapping) and set(params) == {"params"}:
            params = params["params"]
        convert_lib.check_params_fit(params, self._abstract_params(), f"this {type(self).__name__}")
        return dict(params)

    def _abstract_params(self) -> dict:
        return abstract_params(self.config, self.model_type)

    def num_parameters(self) -> int:
        return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(self.params)))

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """The Flax module's `apply` (channels-last input, the module's outputs)."""
        return self.module.apply(variables, *args, **kwargs)

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """The Flax module's `init`."""
        return self.module.init(rngs, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Anything else is the module's (`clone`, `tabulate`, `mae_init`, ...).
        if name.startswith("_") or name in ("module", "config"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # ------------------------------------------------------------------ calling
    def _begin(
        self,
        pixel_values: Any,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
        interpolate_pos_encoding: bool | None,
        return_dict: bool | None,
        train: bool,
    ) -> tuple[_Call, Any]:
        """A call's options (the config's defaults where the call gives None) and pixels."""
        cfg = self.config
        x, channels_first = self._pixels(pixel_values)
        call = _Call(
            channels_first=channels_first,
            attentions=cfg.output_attentions
            if output_attentions is None
            else bool(output_attentions),
            hidden=cfg.output_hidden_states
            if output_hidden_states is None
            else bool(output_hidden_states),
            interpolate=bool(interpolate_pos_encoding),
            as_dict=cfg.return_dict if return_dict is None else bool(return_dict),
            train=bool(train),
        )
        return call, x

    def _forward(self, call: _Call, extra_options: tuple, fn, params: Any, *args: Any) -> Any:
        """`fn(params, *args)`, jitted once per set of options; a tuple unless `return_dict`.

        `fn` reads only the call's options and the (sealed) module, so models of one class and
        an equal module share it: building the same model again does not compile again."""
        key = (type(self), self.module, call.options(), extra_options)
        jitted = _SHARED_FORWARDS.pop(key, None) or jax.jit(fn)
        _SHARED_FORWARDS[key] = jitted  # most recently used last
        while len(_SHARED_FORWARDS) > _SHARED_FORWARDS_SIZE:
            _SHARED_FORWARDS.pop(next(iter(_SHARED_FORWARDS)))
        params = self.params if params is None else params
        out = jitted(params, *args)
        return out if call.as_dict else out.to_tuple()

    def _pixels(self, pixel_values: Any) -> tuple[Any, bool]:
        """(array, channels_first): NCHW as transformers' processor gives it; NHWC where the
        channel axis is unambiguous. Torch tensors are read through NumPy."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        x = pixel_values
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        cfg = self.config
        rank = len(cfg.input_size) + 2
        layout = "[B, C, T, H, W]" if cfg.is_video else "[B, C, H, W]"
        if x.ndim != rank:
            raise ValueError(
                f"pixel_values must be {layout} (what the image processor returns), got shape "
                f"{tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"pixel_values must be normalised floats, got dtype {x.dtype}: run the images "
                "through HieraImageProcessor (processor(images=..., return_tensors='np'))"
            )
        channels = cfg.in_chans
        if x.shape[1] == channels:
            return x, True
        if x.shape[-1] == channels:
            return x, False
        raise ValueError(
            f"pixel_values of shape {tuple(x.shape)} have no axis of {channels} channels where "
            f"{layout} (or channels-last) puts it"
        )

    def _next_key(self) -> jax.Array:
        self._rng, key = jax.random.split(self._rng)
        return key

    def _dropout_key(self, train: bool, dropout_rng: jax.Array | None) -> jax.Array | None:
        if not train:
            return None
        return dropout_rng if dropout_rng is not None else self._next_key()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: HieraConfig | str | os.PathLike | None = None,
        seed: int = 0,
        ignore_mismatched_sizes: bool = False,
        in_chans: int | None = None,
        source: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ):
        """This class with the weights of any name `hiera_jax.load_pretrained` takes.

        A Hugging Face repo id or directory, a timm name, an official URL, a `.pth` file or our
        names. The checkpoint's config.json decides the architecture; `config=` replaces it and
        other keyword arguments change its fields (either vocabulary: `num_labels=10`,
        `dtype="bfloat16"`, `out_features=[...]`, `image_size=...` resamples the position
        tables). A classifier's weights loaded as `HieraModel` drop the head; what the checkpoint
        lacks is initialised from `seed` with a warning, as transformers does;
        `ignore_mismatched_sizes=True` initialises tensors of another shape too (a head for
        another class count).
        """
        init_kwargs = {k: kwargs.pop(k) for k in cls._init_args if k in kwargs}
        if isinstance(config, (str, os.PathLike)):
            config = HieraConfig.from_pretrained(
                config, source=source, revision=revision, token=token
            )
        if "dtype" in kwargs and not isinstance(kwargs["dtype"], str):
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"]).name  # jnp.bfloat16 -> "bfloat16"
        target, model_type, params, _ = loading.load_model(
            pretrained_model_name_or_path,
            model_type=cls.model_type,
            config=config,
            in_chans=in_chans,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            seed=seed,
            source=source,
            revision=revision,
            token=token,
            **kwargs,
        )
        model = cls(target, seed=seed, **init_kwargs)
        model._params = model._fit_loaded(params)
        return model

    def _fit_loaded(self, params: dict) -> dict:
        return params

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        params: Any = None,
        push_to_hub: bool = False,
        **push_kwargs: Any,
    ) -> str:
        """Write transformers' `config.json` and `model.safetensors` (its keys and layouts) into
        `save_directory`: `transformers.<this class>.from_pretrained(save_directory)` loads it,
        and so does every loader here. `push_to_hub=True` then uploads it (`push_to_hub`)."""
        folder = directory_lib.save_pretrained(
            save_directory,
            self._saved_params(self.params if params is None else params),
            self.config,
            model_type=self.model_type,
        )
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", os.path.basename(os.path.normpath(folder)))
            hub.upload_folder(folder, repo_id, **push_kwargs)
        return folder

    def _saved_params(self, params: Any) -> dict:
        return self._checked(params)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        params: Any = None,
        commit_message: str = "Upload model",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Save into a temporary folder and upload it to the Hugging Face repo `repo_id` (created
        if needed) with `huggingface_hub`; returns its commit info."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, params=params)
            return hub.upload_folder(
                tmp,
                repo_id,
                commit_message=commit_message,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )


# ---------------------------------------------------------------------- the classes
class HieraModel(HieraPreTrainedModel):
    """transformers' `HieraModel`: last hidden state, pooled output, hidden states, attentions.

    `add_pooling_layer=False` drops the pooler norm; `is_mae=True` masks the input by `noise`
    ([B, #MUs], the lowest-noise units are kept; drawn at random when not given), as the MAE's
    encoder does, and then `bool_masked_pos` and `ids_restore` are set.
    """

    model_type = "backbone"
    _init_args = ("add_pooling_layer", "is_mae")

    def __init__(
        self,
        config: HieraConfig | None = None,
        add_pooling_layer: bool = True,
        is_mae: bool = False,
        *,
        params: Any = None,
        seed: int = 0,
    ) -> None:
        self.add_pooling_layer = add_pooling_layer
        self.is_mae = is_mae
        super().__init__(config, params=params, seed=seed)

    def _build_module(self, config: HieraConfig) -> nn.Module:
        return hiera_lib.HieraModel(config, add_pooling_layer=self.add_pooling_layer)

    def _abstract_params(self) -> dict:
        params = abstract_params(self.config, self.model_type)
        return (
            params if self.add_pooling_layer else {k: v for k, v in params.items() if k != "norm"}
        )

    def _fit_loaded(self, params: dict) -> dict:
        if not self.add_pooling_layer:
            params = {k: v for k, v in params.items() if k != "norm"}
        return params

    def _saved_params(self, params: Any) -> dict:
        params = self._checked(params)
        if not self.add_pooling_layer:
            raise ValueError(
                "a HieraModel without its pooling layer cannot be saved: transformers' HieraModel "
                "checkpoints hold the pooler norm (build it with add_pooling_layer=True)"
            )
        return params

    def __call__(
        self,
        pixel_values: Any = None,
        noise: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        params: Any = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        mask_rng: jax.Array | None = None,
    ) -> HieraModelOutput | tuple:
        if noise is not None and not self.is_mae:
            raise ValueError(
                "noise masks the input only in an MAE encoder: build HieraModel(config, "
                "is_mae=True) (transformers' HieraModel ignores noise otherwise)"
            )
        call, x = self._begin(
            pixel_values,
            output_attentions,
            output_hidden_states,
            interpolate_pos_encoding,
            return_dict,
            train,
        )
        mask_key = None
        if self.is_mae and noise is None:
            mask_key = mask_rng if mask_rng is not None else self._next_key()

        # Locals, not self: a shared forward (`_forward`) must not keep this model's params.
        module, config = self.module, self.config

        def forward(params, x, noise, mask_key, dropout_key):
            x = call.channels_last(x)
            if mask_key is not None:
                sized_config = hiera_lib.input_config(config, x, call.interpolate)
                noise = masking.random_noise(mask_key, x.shape[0], sized_config.num_mask_units)
            return module.apply(
                {"params": params}, x, noise=noise, rngs=_rngs(dropout_key), **call.module_kwargs()
            )

        options = (noise is not None, mask_key is not None)
        noise = None if noise is None else _array(noise)
        dropout_key = self._dropout_key(train, dropout_rng)
        return self._forward(call, options, forward, params, x, noise, mask_key, dropout_key)


class HieraForImageClassification(HieraPreTrainedModel):
    """transformers' `HieraForImageClassification`: logits and, with `labels`, the loss."""

    model_type = "classification"

    def _build_module(self, config: HieraConfig) -> nn.Module:
        return hiera_lib.HieraForImageClassification(config)

    def __call__(
        self,
        pixel_values: Any = None,
        labels: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        params: Any = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> HieraForImageClassificationOutput | tuple:
        call, x = self._begin(
            pixel_values,
            output_attentions,
            output_hidden_states,
            interpolate_pos_encoding,
            return_dict,
            train,
        )
        problem = None
        if labels is not None:
            labels = _array(labels)
            problem = classification_problem(self.config, labels)
            check_labels(labels, self.config, problem, x.shape[0])

        module = self.module  # not self: a shared forward must not keep this model's params

        def forward(params, x, labels, dropout_key):
            logits, extras = module.apply(
                {"params": params},
                call.channels_last(x),
                return_features=True,  # always a (logits, extras) pair; XLA drops what is unused
                rngs=_rngs(dropout_key),
                **call.module_kwargs(),
            )
            loss = None if problem is None else classification_loss(logits, labels, problem)
            return HieraForImageClassificationOutput(
                loss=loss,
                logits=logits,
                hidden_states=extras.get("hidden_states"),
                attentions=extras.get("attentions"),
                reshaped_hidden_states=extras.get("reshaped_hidden_states"),
            )

        dropout_key = self._dropout_key(train, dropout_rng)
        return self._forward(call, (problem,), forward, params, x, labels, dropout_key)


class HieraForPreTraining(HieraPreTrainedModel):
    """transformers' `HieraForPreTraining`: MAE loss, every token's pixels (`logits`), the mask.

    `noise` ([B, #MUs]) picks the kept units as transformers does (the lowest noise); without it
    the noise is drawn from `mask_rng`, or from this object's own key, which advances every call.
    """

    model_type = "pretraining"

    def _build_module(self, config: HieraConfig) -> nn.Module:
        return mae_lib.HieraForPreTraining(config)

    def __call__(
        self,
        pixel_values: Any = None,
        noise: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        *,
        params: Any = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        mask_rng: jax.Array | None = None,
    ) -> HieraForPreTrainingOutput | tuple:
        call, x = self._begin(
            pixel_values,
            output_attentions,
            output_hidden_states,
            interpolate_pos_encoding,
            return_dict,
            train,
        )
        mask_key = None
        if noise is None:
            mask_key = mask_rng if mask_rng is not None else self._next_key()
        else:
            noise = _array(noise)

        module = self.module  # not self: a shared forward must not keep this model's params

        def forward(params, x, noise, mask_key, dropout_key):
            loss, _, _, _, extras = module.apply(
                {"params": params},
                call.channels_last(x),
                noise=noise,
                return_reconstruction=True,
                rngs=_rngs(dropout_key, mask=mask_key),
                **call.module_kwargs(),
            )
            return HieraForPreTrainingOutput(
                loss=loss,
                logits=extras["pred"],
                bool_masked_pos=extras["visible"],
                ids_restore=extras["ids_restore"],
                hidden_states=extras.get("hidden_states"),
                attentions=extras.get("attentions"),
                reshaped_hidden_states=extras.get("reshaped_hidden_states"),
            )

        dropout_key = self._dropout_key(train, dropout_rng)
        options = (noise is not None,)
        return self._forward(call, options, forward, params, x, noise, mask_key, dropout_key)


class HieraBackbone(HieraPreTrainedModel):
    """transformers' `HieraBackbone`: NCHW maps of the config's `out_features`, each after its
    own LayerNorm. These are Hiera's stage maps; transformers' own backbone skips the unroll and
    computes other maps (see `hiera_jax.models.backbone`)."""

    model_type = "feature_backbone"
    backbone_type = "transformers"  # transformers' BackboneType.TRANSFORMERS (not a timm backbone)
    has_attentions = True  # `forward_with_filtered_kwargs` passes output_attentions on

    def _build_module(self, config: HieraConfig) -> nn.Module:
        return backbone_lib.HieraBackbone(config)

    @property
    def out_feature_channels(self) -> dict[str, int]:
        """Channels of every stage by name, selected or not (transformers' BackboneMixin)."""
        return dict(zip(self.stage_names, self.num_features))

    def forward_with_filtered_kwargs(self, *args: Any, **kwargs: Any):
        """The call, as transformers' `BackboneMixin.forward_with_filtered_kwargs` makes it."""
        if not self.has_attentions:
            kwargs.pop("output_attentions", None)
        return self(*args, **kwargs)

    @property
    def stage_names(self) -> list[str]:
        return self.config.stage_names

    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @property
    def num_features(self) -> list[int]:
        """Channels of `stem`, `stage1`, ... (transformers' `num_features`)."""
        return [self.config.embed_dim, *self.config.stage_dims]

    @property
    def channels(self) -> list[int]:
        """Channels of each output map."""
        return [self.out_feature_channels[name] for name in self.out_features]

    def __call__(
        self,
        pixel_values: Any = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        *,
        interpolate_pos_encoding: bool | None = None,
        params: Any = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> BackboneOutput | tuple:
        call, x = self._begin(
            pixel_values,
            output_attentions,
            output_hidden_states,
            interpolate_pos_encoding,
            return_dict,
            train,
        )

        module = self.module  # not self: a shared forward must not keep this model's params

        def forward(params, x, dropout_key):
            out = module.apply(
                {"params": params},
                call.channels_last(x),
                rngs=_rngs(dropout_key),
                **call.module_kwargs(),
            )
            maps = tuple(jnp.moveaxis(m, -1, 1) for m in out.feature_maps)  # channels-first
            return BackboneOutput(
                feature_maps=maps, hidden_states=out.hidden_states, attentions=out.attentions
            )

        return self._forward(call, (), forward, params, x, self._dropout_key(train, dropout_rng))


CLASSES: dict[str, type[HieraPreTrainedModel]] = {
    "classification": HieraForImageClassification,
    "pretraining": HieraForPreTraining,
    "backbone": HieraModel,
    "feature_backbone": HieraBackbone,
}


# ---------------------------------------------------------------------- the classification loss
def _array(value: Any) -> Any:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return value if hasattr(value, "dtype") else np.asarray(value)


def classification_problem(config: HieraConfig, labels: Any) -> str:
    """transformers' rule: the config's `problem_type`, else regression for one label,
    single-label for integer labels and multi-label for float labels."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_classes == 1:
        return "regression"
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def check_labels(labels: Any, config: HieraConfig, problem: str, batch: int) -> None:
    """ValueError for labels of a shape the loss cannot take (transformers' `view(-1)` rules)."""
    shape = tuple(labels.shape)
    if problem == "single_label_classification" and int(np.prod(shape)) != batch:
        raise ValueError(f"labels must hold one class index per image ({batch}), got shape {shape}")
    if problem == "single_label_classification" and not isinstance(labels, jax.core.Tracer):
        # torch's cross-entropy raises here; a gather out of range would give a NaN loss.
        values = np.asarray(labels)
        bad = values[(values != -100) & ((values < 0) | (values >= config.num_classes))]
        if bad.size:
            raise ValueError(
                f"labels must be class indices in [0, {config.num_classes}) (or -100 to ignore), "
                f"got {sorted(set(bad.tolist()))[:5]}"
            )
    if problem == "multi_label_classification" and shape != (batch, config.num_classes):
        raise ValueError(
            f"multi-label labels must be [batch, num_labels] = {(batch, config.num_classes)}, "
            f"got {shape}"
        )


def classification_loss(logits: jnp.ndarray, labels: jnp.ndarray, problem: str) -> jnp.ndarray:
    """transformers' `ForSequenceClassificationLoss`: MSE, cross-entropy (labels of -100 are
    ignored, the mean is over the rest) or binary cross-entropy with logits."""
    if problem == "regression":
        labels = labels.astype(jnp.float32)
        if logits.shape[-1] == 1:
            return jnp.mean((jnp.squeeze(logits) - jnp.squeeze(labels)) ** 2)
        return jnp.mean((logits - labels) ** 2)
    if problem == "single_label_classification":
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, logits.shape[-1])
        valid = labels != -100
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[:, None], axis=-1)
        return -jnp.sum(picked[:, 0] * valid) / jnp.sum(valid)
    labels = labels.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    # BCEWithLogits: max(x, 0) - x·y + log(1 + exp(-|x|)).
    terms = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.mean(terms)


# ---------------------------------------------------------------------- by name
def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    model_type: str | None = None,
    **kwargs: Any,
) -> tuple[HieraPreTrainedModel, dict]:
    """`(model, params)` for any pretrained name, repo, URL or path: the class the checkpoint
    holds (or `model_type`'s), as `<class>.from_pretrained(name_or_path, **kwargs)` builds it.

    The model is called as transformers' (`model(pixel_values=...)`) and is also the Flax module
    (`model.apply({"params": params}, x)`, channels-last). SAM 2's HieraDet checkpoints give
    `hieradet_loading.load_hieradet`'s `(Flax module, params)` (`input_size=`, `dtype=`,
    `encoder=`, `classifier=`).
    """

    def load(family: families.Family, path: Any):
        if not family.transformers_classes:  # the family's Flax module, as its record loads it
            return family.load(path, model_type=model_type, **kwargs)
        config, found_type, params, _ = loading.load_model(path, model_type=model_type, **kwargs)
        model = CLASSES[found_type](config, seed=kwargs.get("seed", 0))
        model._params = params
        return model, params

    return families.dispatch(name_or_path, load)
