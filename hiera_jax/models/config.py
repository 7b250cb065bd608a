"""Hiera configuration in two vocabularies: its fields, their validation, and (de)serialisation.

`HieraConfig` stores one canonical form whose field names are the keyword arguments of the official
`Hiera` / `MaskedAutoencoderHiera` constructors (`stages`, `q_pool`, `dim_mul`, ...), so a config
reads like the PyTorch call that built a checkpoint. It is also built from, and written as, the
Hugging Face `transformers.HieraConfig` (`depths`, `num_query_pool`, `embed_dim_multiplier`, ...):
both spellings of a field land in the same field, `to_dict()` writes transformers' `config.json`,
and the Hugging Face names read back as properties (`hf_names.TransformersNames`). Everything the
modules need that follows from the fields (per-block widths, windows, unroll schedules) is derived
once, in plain Python, by `geometry.HieraGeometry`, so the modules only see static shapes. The
official variants are `variants.py`'s.

Two things differ between the two codebases, not only in name:

- `num_heads` is one number per stage here (transformers' form). The official `num_heads=1,
  head_mul=2.0` is accepted and expanded as the official constructor does.
- For some architectures the two compute different models from the same hyper-parameters:
  transformers shrinks attention windows by the query stride at every stage, pooled or not, and
  lets a stage's first block use mask-unit attention if either its own stage or the previous one
  does; the official code shrinks windows only where it pools and takes the previous stage's
  choice. They agree for every published model. `block_rule` records which rule a config means:
  configs written with transformers' names get "transformers", the official names "official", and
  where the two give the same blocks it is stored as "official", so equal models compare equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hiera_jax.models.activations import ACTIVATIONS
from hiera_jax.models.geometry import BLOCK_RULES, HieraGeometry, Shape
from hiera_jax.models.hf_names import (
    HF_ALIASES,
    HF_ATTRIBUTE_DEFAULTS,
    HF_DERIVED_INPUTS,
    HF_EXTRAS_KEY,
    HF_FILE_KEYS,
    HF_KEPT_ATTRIBUTES,
    HF_METADATA_KEYS,
    OFFICIAL_INPUTS,
    TransformersNames,
)
from hiera_jax.models.kernels.tpu import check_kernel


@dataclasses.dataclass(init=False, eq=True)
class HieraConfig(HieraGeometry, TransformersNames):
    """Hyper-parameters of a Hiera model: official field names, transformers' accepted too.

    `HieraConfig(stages=(1, 2, 7, 2), num_heads=1)` and
    `HieraConfig(depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8])` are the same config. An unknown
    keyword, a field given under both names, or a value the models cannot honour is a ValueError.

    Attributes can be set, under either vocabulary, as on transformers' `PretrainedConfig`
    (`config.num_labels = 10` renames the classes `LABEL_i`; `config.out_features = None` resets
    the backbone's stages): each assignment is validated at once. A model keeps a sealed copy
    (`frozen()`), so changing a config after building a model from it changes neither that model
    nor its `model.config`, which refuses assignments (change `copy.deepcopy(model.config)`).
    The defaults are transformers' (`num_labels` 2, no decoder size: an MAE built from such a
    config gets the official 512-wide, 8-deep, 16-head decoder).
    """

    input_size: Shape = (224, 224)  # (H, W) for images, (T, H, W) for video; HF image_size
    in_chans: int = 3  # HF num_channels
    embed_dim: int = 96  # width of the first stage
    num_heads: Shape = (1, 2, 4, 8)  # heads per stage (official: num_heads=1, head_mul=2.0)
    num_classes: int = 2  # HF num_labels (transformers' default; the official variants: 1000)
    stages: Shape = (2, 3, 16, 3)  # blocks per stage; HF depths
    q_pool: int = 3  # number of stage transitions that pool queries; HF num_query_pool
    q_stride: Shape = (2, 2)  # HF query_stride
    mask_unit_size: Shape = (8, 8)  # in tokens; HF masked_unit_size
    mask_unit_attn: tuple[bool, ...] = (True, True, False, False)  # HF masked_unit_attention
    dim_mul: float = 2.0  # HF embed_dim_multiplier
    patch_kernel: Shape = (7, 7)  # HF patch_size
    patch_stride: Shape = (4, 4)
    patch_padding: Shape = (3, 3)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    hidden_act: str = "gelu"  # the MLP's activation (transformers' names; gelu = exact erf)
    layer_norm_eps: float = 1e-6
    block_rule: str = "official"  # "official" or "transformers": see the module docstring
    norm_layer: str = "LayerNorm"  # the only norm the official models use
    head_dropout: float = 0.0
    head_init_scale: float = 0.001
    initializer_range: float = 0.02  # std of the classifier-style init (official trunc_normal)
    layer_norm_init: float = 1.0  # initial LayerNorm scale
    sep_pos_embed: bool = False  # separate spatial/temporal position embeddings (video)
    # timm-only options (`timm.models.hiera.Hiera` kwargs, used by the *_abswin_* variants).
    abs_win_pos_embed: bool = False  # global table resized to the grid + a tiled window table
    global_pos_size: Shape = (14, 14)  # grid of the global table with abs_win_pos_embed
    init_values: float | None = None  # LayerScale (`ls1`/`ls2.gamma`) initial value; None = off
    use_expand_proj: bool = True  # False: widen by concatenating max- and avg-pooled x
    weight_init: str = ""  # "" = the official init; "jax" = timm's jax init and fix_init
    # MAE decoder (official `MaskedAutoencoderHiera` kwargs) and masking.
    # None (transformers' default): the official decoder, 512 wide, 8 deep, 16 heads
    # (`decoder_width`, `decoder_blocks`, `decoder_heads`).
    decoder_embed_dim: int | None = None  # HF decoder_hidden_size
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mask_ratio: float = 0.6  # fraction of mask units dropped (0.6 images, 0.9 video)
    normalize_pixel_loss: bool = True  # MAE targets normalised per patch (official norm_pix)
    # Labels and outputs (transformers' id2label, problem_type, out_features / out_indices).
    class_names: tuple[str, ...] | None = None  # names of the classes in order; None = unnamed
    problem_type: str | None = None  # classification loss: None = chosen by the labels' dtype
    out_stage_indices: tuple[int, ...] | None = None  # HieraBackbone outputs; None = last stage
    output_hidden_states: bool = False  # the Hugging Face-style call's defaults
    output_attentions: bool = False
    return_dict: bool = True
    # Execution switches: they change speed and memory, never the parameters.
    dtype: str = "float32"  # compute dtype; parameters always stay float32
    remat: bool = False  # rematerialise each block in the backward pass
    # Each run of identical blocks as one lax.scan (compiled once). None = on when tracing for a
    # CPU only: unrolled, GPU steps ran faster and TPU steps move fewer bytes (scan.auto_scan).
    scan_blocks: bool | None = None
    # Softmax attention: "auto" = a Pallas kernel on TPU (no [n_q, n_k] block reaches HBM; windows
    # too large for VMEM excepted), XLA elsewhere; "xla" never; "pallas" everywhere
    # (interpreted off TPU). hiera_jax.models.attention.
    attention_kernel: str = "auto"
    # The MLP: "auto" = one Pallas kernel on TPU (the [N, 4·C] hidden activation stays in VMEM;
    # MLPs too wide for VMEM or too few tokens excepted), XLA elsewhere; "xla"; "pallas" as above.
    # hiera_jax.models.kernels.fused_mlp. It also switches the LayerNorms' GPU backward
    # (hiera_jax.models.kernels.gpu_norm).
    mlp_kernel: str = "auto"

    def __init__(self, **kwargs: Any) -> None:
        # transformers' common attributes (`architectures`, token ids, ...): kept beside the
        # fields, out of equality and hashing (they do not change the model), read back by
        # `__getattr__` and written by `to_dict`.
        kept = {k: _json_copy(kwargs[k]) for k in HF_KEPT_ATTRIBUTES - set(_FIELDS) if k in kwargs}
        object.__setattr__(self, "_hf_attributes", kept)
        object.__setattr__(self, "_sealed", False)
        values = _canonical_kwargs(kwargs)
        size = values.get("input_size")
        if isinstance(size, int) and not isinstance(size, bool):
            values["input_size"] = (size, size)  # a square image side
        for field in dataclasses.fields(self):
            value = values.pop(field.name, field.default)
            object.__setattr__(self, field.name, _freeze(value))
        assert not values, values  # _canonical_kwargs rejects unknown names
        self.validate()
        if self.block_rule == "transformers" and self._rules_agree():
            object.__setattr__(self, "block_rule", "official")
        # label2id as given (transformers keeps `{"label": "0"}` as it is), if it names these
        # classes; `label2id` reads it back, `to_dict` writes it.
        given = kwargs.get("label2id")
        if isinstance(given, Mapping) and given != TransformersNames.label2id.fget(self):
            self._hf_attributes["label2id"] = _json_copy(dict(given))

    # ------------------------------------------------------------------ mutability
    def __setattr__(self, name: str, value: Any) -> None:
        """transformers' `config.x = v`: the config with `x` changed (either vocabulary),
        validated now; transformers' common attributes are kept as given."""
        if self.__dict__.get("_sealed"):
            raise dataclasses.FrozenInstanceError(
                f"cannot set {name!r}: this HieraConfig belongs to a built model, which keeps it "
                "unchanged; change a copy (copy.deepcopy(model.config) or "
                "model.config.replace(...)) and build a model from it"
            )
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in _SETTABLE:
            changed = self.replace(**{name: value})
            self.__dict__.update(changed.__dict__)
        elif name in HF_KEPT_ATTRIBUTES:
            self._hf_attributes[name] = _json_copy(value)
        else:
            derived = isinstance(getattr(type(self), name, None), property)
            close = difflib.get_close_matches(name, sorted({*_SETTABLE, *HF_KEPT_ATTRIBUTES}), 1)
            raise AttributeError(
                f"HieraConfig.{name} "
                + (
                    "is derived from the other fields and cannot be set"
                    if derived
                    else "is not a field" + (f" (did you mean {close[0]!r}?)" if close else "")
                )
            )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"HieraConfig fields cannot be deleted ({name!r})")

    def __hash__(self) -> int:
        # By value, as the frozen dataclass it was: the models and the compile caches key on it.
        # Models hold sealed copies (`frozen()`), which never change.
        return hash(tuple(getattr(self, name) for name in _FIELDS))

    def frozen(self) -> HieraConfig:
        """This config sealed against changes: itself if sealed, else a sealed copy. Models call
        it when they are built, so a later change to the caller's config cannot reach them."""
        return self if self.is_frozen else self._copy(sealed=True)

    @property
    def is_frozen(self) -> bool:
        return bool(self.__dict__.get("_sealed", False))

    def _copy(self, sealed: bool) -> HieraConfig:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        object.__setattr__(new, "_hf_attributes", _json_copy(self._hf_attributes))
        object.__setattr__(new, "_sealed", sealed)
        return new

    def __copy__(self) -> HieraConfig:
        return self._copy(sealed=False)

    def __deepcopy__(self, memo: dict) -> HieraConfig:
        """A changeable copy (the fields are immutable values), as transformers' tests make."""
        return self._copy(sealed=False)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError for a config the official code would reject or mis-shape."""
        for name in _SEQUENCE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, tuple) and not (value is None and name in _OPTIONAL_FIELDS):
                raise ValueError(f"{name} must be a list, got {value!r}")
        dims = len(self.input_size)
        if dims not in (2, 3):
            raise ValueError(f"input_size must be (H, W) or (T, H, W), got {self.input_size}")
        for name in ("input_size", "stages", "num_heads", "q_stride", "mask_unit_size",
                     "patch_kernel", "patch_stride", "global_pos_size"):  # fmt: skip
            if any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in getattr(self, name)
            ):
                raise ValueError(f"{name} must hold positive integers, got {getattr(self, name)}")
        for name in ("in_chans", "embed_dim", "num_classes", "decoder_embed_dim",
                     "decoder_depth", "decoder_num_heads"):  # fmt: skip
            value = getattr(self, name)
            if value is None and name.startswith("decoder_"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in self.patch_padding):
            raise ValueError(f"patch_padding must hold integers >= 0, got {self.patch_padding}")
        for name in ("q_stride", "mask_unit_size", "patch_kernel", "patch_stride", "patch_padding"):
            if len(getattr(self, name)) != dims:
                raise ValueError(
                    f"{name}={getattr(self, name)} has {len(getattr(self, name))} dims but "
                    f"input_size={self.input_size} has {dims}"
                )
        if self.abs_win_pos_embed:
            if self.sep_pos_embed or dims != 2:
                raise ValueError(
                    "abs_win_pos_embed is for image models (2-D input_size, sep_pos_embed=False)"
                )
            if len(self.global_pos_size) != 2:
                raise ValueError(
                    f"global_pos_size must be (H, W) of positive sizes, got {self.global_pos_size}"
                )
        if self.weight_init not in ("", "jax"):
            raise ValueError(
                f"weight_init must be '' (official) or 'jax', got {self.weight_init!r}"
            )
        if not self.use_expand_proj and self.dim_mul != 2.0:
            raise ValueError(
                "use_expand_proj=False widens by concatenating two pooled copies, so it needs "
                f"dim_mul=2, got {self.dim_mul}"
            )
        if self.norm_layer != "LayerNorm":
            raise ValueError(f"norm_layer={self.norm_layer!r} is not supported; use 'LayerNorm'")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; supported: "
                f"{', '.join(sorted(ACTIVATIONS))}"
            )
        if self.block_rule not in BLOCK_RULES:
            raise ValueError(f"block_rule must be one of {BLOCK_RULES}, got {self.block_rule!r}")
        for name in ("attention_kernel", "mlp_kernel"):
            check_kernel(getattr(self, name), name)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if not self.dim_mul > 0 or not self.mlp_ratio > 0:
            raise ValueError(
                f"dim_mul and mlp_ratio must be > 0, got {self.dim_mul} and {self.mlp_ratio}"
            )
        if len(self.num_heads) != len(self.stages):
            raise ValueError(
                f"num_heads {self.num_heads} has {len(self.num_heads)} entries but there are "
                f"{len(self.stages)} stages: give one per stage, or one int for the first stage "
                "(multiplied by head_mul at each stage)"
            )
        if len(self.mask_unit_attn) != len(self.stages):
            raise ValueError(
                f"mask_unit_attn has {len(self.mask_unit_attn)} entries but there are "
                f"{len(self.stages)} stages"
            )
        if isinstance(self.q_pool, bool) or not isinstance(self.q_pool, int):
            raise ValueError(f"q_pool must be an integer, got {self.q_pool!r}")
        if not 0 <= self.q_pool < len(self.stages):
            raise ValueError(
                f"q_pool={self.q_pool} is too large: it must be at least 0 and less than the "
                f"number of stages ({len(self.stages)})"
            )
        for size, stride in zip(self.input_size, self.patch_stride):
            if size % stride:
                raise ValueError(
                    f"input_size {self.input_size} is not divisible by patch_stride "
                    f"{self.patch_stride}"
                )
        unroll_stride = [s ** (len(self.stages) - 1) for s in self.q_stride]
        for tokens, stride in zip(self.tokens_spatial_shape, unroll_stride):
            if tokens % stride:
                raise ValueError(
                    f"the token grid {self.tokens_spatial_shape} (input_size / patch_stride) "
                    f"must be divisible by q_stride ** (len(stages) - 1) = {tuple(unroll_stride)}"
                )
        for tokens, mu in zip(self.tokens_spatial_shape, self.mask_unit_size):
            if tokens % mu:
                raise ValueError(
                    f"the token grid {self.tokens_spatial_shape} is not divisible by "
                    f"mask_unit_size {self.mask_unit_size}"
                )
        pooled = [s**self.q_pool for s in self.q_stride]
        for mu, stride in zip(self.mask_unit_size, pooled):
            if mu % stride:
                raise ValueError(
                    f"mask_unit_size {self.mask_unit_size} is not divisible by the pooled stride "
                    f"q_stride ** q_pool = {tuple(pooled)}"
                )
        tokens = self.num_tokens
        for i, spec in enumerate(self.block_specs):
            if spec.dim_out % spec.heads:
                raise ValueError(
                    f"a block of width {spec.dim_out} cannot split into {spec.heads} heads"
                )
            if spec.use_mask_unit_attn and (
                spec.window_size < 1 or tokens % (spec.q_stride * spec.window_size)
            ):
                raise ValueError(
                    f"block {i} attends within windows of {spec.window_size} tokens "
                    f"(block_rule={self.block_rule!r}), which do not tile its {tokens} tokens"
                )
            tokens //= spec.q_stride
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_embed_dim={self.decoder_width} is not divisible by "
                f"decoder_num_heads={self.decoder_heads}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for num_classes={self.num_classes}"
            )
        if self.problem_type not in (
            None, "regression", "single_label_classification", "multi_label_classification"
        ):  # fmt: skip
            raise ValueError(
                f"problem_type must be None, 'regression', 'single_label_classification' or "
                f"'multi_label_classification', got {self.problem_type!r}"
            )
        if self.out_stage_indices is not None:
            _check_out_indices(self.out_stage_indices, len(self.stages) + 1)

    def __getattr__(self, name: str) -> Any:
        """transformers' common attributes: given ones, else their defaults (`architectures`...);
        any other unknown name is an AttributeError, as for any object."""
        if not name.startswith("__"):
            kept = self.__dict__.get("_hf_attributes", {})
            if name in kept:
                return kept[name]
            if name in HF_ATTRIBUTE_DEFAULTS:
                return HF_ATTRIBUTE_DEFAULTS[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def replace(self, **changes: Any) -> HieraConfig:
        """A copy with `changes` (either vocabulary) applied; the block rule is kept unless given.

        Another number of stages keeps the rule of heads that grow by one factor per stage (the
        official `num_heads` and `head_mul`); other per-stage heads must then be given too.
        """
        values = dataclasses.asdict(self)
        names = set(changes)
        canonical = {HF_ALIASES.get(k, k) for k in names}
        if "num_heads" not in canonical:
            stages = changes.get("stages", changes.get("depths"))
            head_mul = changes.get("head_mul")
            if head_mul is None and stages is not None and len(stages) != len(self.stages):
                head_mul = self._head_multiplier()
            if head_mul is not None:
                values["num_heads"] = self.num_heads[0]
                changes = {**changes, "head_mul": head_mul}
        labels = {"id2label", "label2id"} & names
        if labels:
            values.pop("class_names")
            values.pop("num_classes")
        elif "num_classes" in canonical and "class_names" not in names:
            count = changes.get("num_classes", changes.get("num_labels"))
            if count != self.num_classes:  # another class count: the old names no longer apply
                values.pop("class_names")
                labels = {"num_classes"}
        if {"out_features", "out_indices"} & names:
            values.pop("out_stage_indices")
        for key in canonical & set(values):
            values.pop(key)
        kept = {k: v for k, v in self._hf_attributes.items() if k not in changes}
        if labels or "class_names" in names:
            kept.pop("label2id", None)  # written for the old classes
        return type(self)(**kept, **values, **changes)

    def _head_multiplier(self) -> float | None:
        """The factor the heads grow by per stage, if they follow the official rule."""
        heads = self.num_heads
        if len(heads) == 1:
            return 2.0
        factor = heads[1] / heads[0]
        for before, after in zip(heads, heads[1:]):
            if int(before * factor) != after:
                return None
        return factor

    def to_dict(self) -> dict[str, Any]:
        """transformers' `config.json` for this config, plus our own fields under `hiera_jax`."""
        out: dict[str, Any] = {
            "model_type": "hiera",
            "embed_dim": self.embed_dim,
            "image_size": list(self.input_size),
            "patch_size": list(self.patch_kernel),
            "patch_stride": list(self.patch_stride),
            "patch_padding": list(self.patch_padding),
            "mlp_ratio": self.mlp_ratio,
            "depths": list(self.stages),
            "num_heads": list(self.num_heads),
            "embed_dim_multiplier": self.dim_mul,
            "num_query_pool": self.q_pool,
            "query_stride": list(self.q_stride),
            "masked_unit_size": list(self.mask_unit_size),
            "masked_unit_attention": list(self.mask_unit_attn),
            "drop_path_rate": self.drop_path_rate,
            "num_channels": self.in_chans,
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
            "layer_norm_init": self.layer_norm_init,
            "layer_norm_eps": self.layer_norm_eps,
            "decoder_hidden_size": self.decoder_embed_dim,
            "decoder_depth": self.decoder_depth,
            "decoder_num_heads": self.decoder_num_heads,
            "normalize_pixel_loss": self.normalize_pixel_loss,
            "mask_ratio": self.mask_ratio,
            "hidden_size": self.hidden_size,
            "stage_names": self.stage_names,
            "out_features": self.out_features,
            "out_indices": self.out_indices,
            "id2label": {str(i): name for i, name in self.id2label.items()},
            "label2id": self.label2id,
            "problem_type": self.problem_type,
            "output_hidden_states": self.output_hidden_states,
            "output_attentions": self.output_attentions,
            "return_dict": self.return_dict,
        }
        out.update({k: _json_copy(v) for k, v in self._hf_attributes.items()})
        out[HF_EXTRAS_KEY] = {name: _jsonable(getattr(self, name)) for name in _EXTRA_FIELDS}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> HieraConfig:
        """A config from transformers' `config.json` (ours included), our older `config.json`
        (`{"format": "hiera-jax", "config": {...}}`) or a plain dict of keyword arguments.

        In a transformers file a missing `id2label` means 2 labels, as transformers reads it,
        and the file's `dtype` (the weights' storage type) is not the compute dtype.
        """
        values = dict(values)
        if values.get("format") == "hiera-jax" and isinstance(values.get("config"), Mapping):
            return cls(**{**values["config"], **overrides})
        if "model_type" in values:
            if values["model_type"] != "hiera":
                raise ValueError(
                    f"config.json has model_type {values['model_type']!r}, not a Hiera model "
                    "('hiera')"
                )
            extras = values.pop(HF_EXTRAS_KEY, None) or {}
            if not isinstance(extras, Mapping):
                raise ValueError(f"config.json's {HF_EXTRAS_KEY!r} entry must be an object")
            # The file's own keys go (`dtype` there is the weights' storage type); transformers'
            # common attributes stay.
            values = {k: v for k, v in values.items() if k not in HF_FILE_KEYS}
            if not {"id2label", "num_labels", "num_classes"} & set(values):
                values["num_labels"] = 2  # transformers' default, which its files leave out
            values.update(extras)
        return cls(**{**values, **overrides})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_json_string(self, use_diff: bool = True) -> str:
        """config.json's text, as transformers' `to_json_string` (`use_diff` is accepted: the
        file always holds every field, which transformers reads the same)."""
        del use_diff
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write `to_json_string()` to a file, as transformers' `to_json_file`."""
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff=use_diff))

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> HieraConfig:
        """A config from a config.json file (`from_dict` of its contents)."""
        with open(json_file, encoding="utf-8") as f:
            values = json.load(f)
        if not isinstance(values, Mapping):
            raise ValueError(f"{os.fspath(json_file)} does not hold a JSON object")
        return cls.from_dict(values)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `config.json` (transformers' form) into `directory`."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> HieraConfig:
        """The config of a pretrained model: a directory, a Hugging Face repo id, or any name
        `hiera_jax.load_pretrained` takes. `revision`, `token`, `source` go to the hub; other
        keyword arguments override fields (either vocabulary)."""
        if _PRETRAINED_READER is None:  # set when hiera_jax.weights is imported
            raise RuntimeError("import hiera_jax to read pretrained configs")
        hub_args = {k: kwargs.pop(k) for k in ("revision", "token", "source") if k in kwargs}
        config = _PRETRAINED_READER(name_or_path, **hub_args)
        return config.replace(**kwargs) if kwargs else config


# Set by hiera_jax.weights: `(name_or_path, **hub_args) -> HieraConfig`. The config layer sits
# below the weights layer, so the weights layer registers how to read a pretrained config.
_PRETRAINED_READER: Callable[..., HieraConfig] | None = None


def register_pretrained_reader(reader: Callable[..., HieraConfig]) -> None:
    global _PRETRAINED_READER
    _PRETRAINED_READER = reader


_FIELDS = tuple(f.name for f in dataclasses.fields(HieraConfig))
_SEQUENCE_FIELDS = tuple(
    f.name for f in dataclasses.fields(HieraConfig) if str(f.type).startswith(("Shape", "tuple"))
)
_OPTIONAL_FIELDS = ("class_names", "out_stage_indices")
# What `config.x = v` changes through `replace`: fields under either name, and the inputs that map
# onto fields by a rule (id2label, out_features, head_mul, ...).
_SETTABLE = frozenset({*_FIELDS, *HF_ALIASES, *HF_DERIVED_INPUTS, *OFFICIAL_INPUTS})
_HF_FIELDS = frozenset(
    {
        "input_size", "in_chans", "embed_dim", "num_heads", "num_classes", "stages", "q_pool",
        "q_stride", "mask_unit_size", "mask_unit_attn", "dim_mul", "patch_kernel",
        "patch_stride", "patch_padding", "mlp_ratio", "drop_path_rate", "hidden_act",
        "layer_norm_eps", "initializer_range", "layer_norm_init", "decoder_embed_dim",
        "decoder_depth", "decoder_num_heads", "mask_ratio", "normalize_pixel_loss",
        "class_names", "problem_type", "out_stage_indices", "output_hidden_states",
        "output_attentions", "return_dict",
    }
)  # fmt: skip
# Fields that change how a model computes, never its parameters.
EXECUTION_FIELDS = ("dtype", "remat", "scan_blocks", "attention_kernel", "mlp_kernel")
_EXTRA_FIELDS = tuple(name for name in _FIELDS if name not in _HF_FIELDS)


def _canonical_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor keywords in either vocabulary -> canonical field values (only those given)."""
    kwargs = dict(kwargs)
    unknown = [
        k
        for k in kwargs
        if k not in _FIELDS
        and k not in HF_ALIASES
        and k not in HF_DERIVED_INPUTS
        and k not in OFFICIAL_INPUTS
        and k not in HF_METADATA_KEYS
    ]
    if unknown:
        known = sorted({*_FIELDS, *HF_ALIASES, *HF_DERIVED_INPUTS, *OFFICIAL_INPUTS})
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown HieraConfig field(s) {', '.join(hints)}; known fields: {', '.join(known)}"
        )
    if kwargs.get("model_type", "hiera") != "hiera":
        raise ValueError(f"model_type must be 'hiera', got {kwargs['model_type']!r}")
    hf_vocabulary = bool(set(kwargs) & (set(HF_ALIASES) | set(HF_DERIVED_INPUTS)))
    for key in HF_METADATA_KEYS - set(_FIELDS):  # `dtype` here is the compute dtype
        kwargs.pop(key, None)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        name = HF_ALIASES.get(key, key)
        if name in out:
            other = next(k for k in kwargs if k != key and HF_ALIASES.get(k, k) == name)
            raise ValueError(f"{key} and {other} are the same HieraConfig field; give one of them")
        out[name] = value
    for name in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if name in out and out[name] is None:  # transformers' "no decoder": only the MAE builds
            del out[name]  # one, and with the official decoder's size (512 wide, 8 deep, 16 heads)
    if hf_vocabulary and "block_rule" not in out:
        out["block_rule"] = "transformers"
    _expand_heads(out)
    _labels(out)
    _backbone_outputs(out)
    return out


def _expand_heads(out: dict[str, Any]) -> None:
    """num_heads: one int (the official first-stage heads, times head_mul per stage) or a list."""
    head_mul = out.pop("head_mul", None)
    heads = out.get("num_heads", 1 if head_mul is not None or "stages" in out else None)
    if heads is None:
        return
    if isinstance(heads, (list, tuple)):
        if head_mul is not None:
            raise ValueError("head_mul only applies to an int num_heads, not per-stage heads")
        return
    if isinstance(heads, bool) or not isinstance(heads, int):
        raise ValueError(f"num_heads must be an int or one int per stage, got {heads!r}")
    head_mul = 2.0 if head_mul is None else float(head_mul)
    stages = out.get("stages", HieraConfig.stages)
    if not isinstance(stages, (list, tuple)):
        return  # validate() reports the stages
    per_stage = [heads]
    for _ in range(len(stages) - 1):
        per_stage.append(int(per_stage[-1] * head_mul))  # the official constructor's rule
    out["num_heads"] = tuple(per_stage)


def _labels(out: dict[str, Any]) -> None:
    """id2label / label2id / num_labels -> num_classes and class_names."""
    id2label = out.pop("id2label", None)
    label2id = out.pop("label2id", None)
    if id2label is not None:
        if not isinstance(id2label, Mapping):
            raise ValueError(f"id2label must be a mapping of index to name, got {id2label!r}")
        try:
            indexed = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"id2label keys must be class indices, got {list(id2label)}") from err
        if sorted(indexed) != list(range(len(indexed))):
            raise ValueError(f"id2label must name classes 0..N-1, got indices {sorted(indexed)}")
        names = tuple(indexed[i] for i in range(len(indexed)))
        if "num_classes" in out and out["num_classes"] != len(names):
            raise ValueError(
                f"num_labels/num_classes={out['num_classes']} but id2label names {len(names)}"
            )
        if "class_names" in out:
            raise ValueError("give class names as id2label or class_names, not both")
        out["num_classes"] = len(names)
        out["class_names"] = names
    if label2id is not None:
        if not isinstance(label2id, Mapping):
            raise ValueError(f"label2id must be a mapping of name to index, got {label2id!r}")
        names = out.get("class_names")
        if names is None:
            inverse = {int(v): str(k) for k, v in label2id.items()}
            if sorted(inverse) != list(range(len(inverse))):
                raise ValueError(f"label2id must map to 0..N-1, got {sorted(inverse)}")
            out["class_names"] = tuple(inverse[i] for i in range(len(inverse)))
            out.setdefault("num_classes", len(inverse))
        elif {str(k): int(v) for k, v in label2id.items()} != {n: i for i, n in enumerate(names)}:
            raise ValueError("label2id is not the inverse of id2label")
    names = out.get("class_names")
    if names is not None:
        names = tuple(str(n) for n in names)
        # transformers' placeholder names mean "no names"; stored as None (one form).
        out["class_names"] = (
            None if names == tuple(f"LABEL_{i}" for i in range(len(names))) else names
        )


def _backbone_outputs(out: dict[str, Any]) -> None:
    """out_features / out_indices (transformers' backbone rules) -> out_stage_indices."""
    features = out.pop("out_features", None)
    indices = out.pop("out_indices", None)
    if features is None and indices is None:
        if out.get("out_stage_indices") is not None:
            out["out_stage_indices"] = tuple(out["out_stage_indices"])
        return
    stages = out.get("stages", HieraConfig.stages)
    names = ["stem"] + [f"stage{i}" for i in range(1, len(stages) + 1)]
    if features is not None:
        if isinstance(features, str) or not all(isinstance(f, str) for f in features):
            raise ValueError(f"out_features must be a list of stage names, got {features!r}")
        unknown = [f for f in features if f not in names]
        if unknown:
            raise ValueError(f"out_features {unknown} are not stage names {names}")
        from_features = tuple(names.index(f) for f in features)
    if indices is not None:
        if isinstance(indices, int) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise ValueError(f"out_indices must be a list of ints, got {indices!r}")
        if any(not -len(names) <= i < len(names) for i in indices):
            raise ValueError(f"out_indices {list(indices)} out of range for stages {names}")
        from_indices = tuple(i % len(names) for i in indices)
    if features is not None and indices is not None and from_features != from_indices:
        raise ValueError(
            f"out_features {list(features)} and out_indices {list(indices)} name different stages"
        )
    chosen = from_features if features is not None else from_indices
    _check_out_indices(chosen, len(names))
    out["out_stage_indices"] = None if chosen == (len(names) - 1,) else chosen


def _check_out_indices(indices: Sequence[int], num_names: int) -> None:
    if not indices:
        raise ValueError("the backbone needs at least one output stage")
    if any(not 0 <= i < num_names for i in indices):
        raise ValueError(f"output stage indices {list(indices)} out of range 0..{num_names - 1}")
    if list(indices) != sorted(set(indices)):
        raise ValueError(f"output stages must be distinct and in stage order, got {list(indices)}")


def _freeze(value: Any) -> Any:
    """Lists (JSON, command lines) as tuples, so configs stay hashable."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _json_copy(value: Any) -> Any:
    """A copy of a JSON-like value that the config owns (a caller's list or dict stays theirs)."""
    return json.loads(json.dumps(value))
