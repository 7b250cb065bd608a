"""timm and SAM 2 HieraDet state dicts <-> Flax params of `hiera_jax.models.hieradet.HieraDet`.

timm (`sam2_hiera_*`) and SAM 2 differ only by key names: SAM 2 checkpoints hold the whole model
as `{"model": state_dict}`, the trunk under `image_encoder.trunk.`, and name the MLP layers
`mlp.layers.0/1` (timm's `checkpoint_filter_fn` does the same renames). Both are renamed to timm's
trunk keys, then one rule maps a key to a Flax path: `blocks.3.attn.qkv.weight` ->
`blocks_3/attn/qkv/kernel` (transposed). The rest of a SAM 2 model (neck, decoders, memory) and
timm's classifier head (`head.*`) are not the trunk and are left out; any other tensor no
parameter takes, a parameter no tensor fills, or a shape that does not fit is a ValueError
naming every such key. Names and shapes are checked before any tensor is read, so
`check_state_dict` works on torch's meta tensors. `convert_image_encoder_state_dict` /
`export_image_encoder_state_dict` do the same for SAM 2's whole image encoder (trunk and FPN
neck, `hiera_jax.models.hieradet_neck.ImageEncoder`).

Hugging Face transformers' SAM 2 (`Sam2HieraDetModel`, `Sam2VisionModel`, and `Sam2Model` /
`Sam2VideoModel` whose `vision_encoder.*` is the vision model) is a third layout: the trunk under
`backbone.`, with `patch_embed.projection`, `layer_norm1/2` and `mlp.proj_in/proj_out` for timm's
`patch_embed.proj`, `norm1/2` and `mlp.fc1/fc2`, and the neck's convs as `neck.convs.N.*` (no
`.conv`). A full model's other tensors (`TRANSFORMERS_NON_VISION`) are skipped; any other key
is a ValueError.
The transformers configs themselves are translated in `hieradet_hf_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hiera_jax.models.hieradet import (
    VARIANTS,
    HieraDet,
    HieraDetConfig,
    HieraDetForImageClassification,
)
from hiera_jax.models.hieradet_neck import FpnNeckConfig, ImageEncoder
from hiera_jax.weights.convert import check_params_fit, to_numpy, unwrap_state_dict

SAM2_PREFIX = "image_encoder.trunk."
ENCODER_PREFIX = "image_encoder."
_NECK_KEY = re.compile(r"convs\.(\d+)\.conv\.(weight|bias)")  # SAM 2 FpnNeck, under `neck.`
_HF_NECK_KEY = re.compile(r"convs\.(\d+)\.(weight|bias)")  # transformers' Sam2VisionNeck
EXPORT_FORMATS = ("timm", "sam2", "transformers")
_TIMM_TO_SAM2 = (("mlp.fc1.", "mlp.layers.0."), ("mlp.fc2.", "mlp.layers.1."))
# transformers: `Sam2Model.vision_encoder` is a `Sam2VisionModel`, whose `backbone` is the
# `Sam2HieraDetModel` trunk and whose `neck` is `Sam2VisionNeck` (1x1 convs `convs.N`, SAM 2's order).
TRANSFORMERS_PREFIX = "vision_encoder."
TRANSFORMERS_TRUNK = "backbone."
TRANSFORMERS_NECK = "neck."
# The top-level modules and parameters of transformers' `Sam2Model` and `Sam2VideoModel` besides
# `vision_encoder` (the video ones also fill `Sam2Model._keys_to_ignore_on_load_unexpected`):
# prompt encoder, mask decoder and memory, not the image encoder. Skipped on conversion.
TRANSFORMERS_NON_VISION = (
    "shared_image_embedding",
    "prompt_encoder",
    "mask_decoder",
    "no_memory_embedding",
    "memory_attention",
    "memory_encoder",
    "memory_temporal_positional_encoding",
    "no_memory_positional_encoding",
    "no_object_pointer",
    "mask_downsample",
    "object_pointer_proj",
    "temporal_positional_encoding_projection_layer",
    "occlusion_spatial_embedding_parameter",
)
_TIMM_TO_TRANSFORMERS = (
    ("patch_embed.proj.", "patch_embed.projection."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".mlp.fc1.", ".mlp.proj_in."),
    (".mlp.fc2.", ".mlp.proj_out."),
)
_TABLES = ("pos_embed", "pos_embed_window")  # [1, C, H, W] in torch, [1, H, W, C] here
# timm trunk keys the Flax model has: the patch conv, the two tables, and per block its norms,
# linears (`proj` only where the width changes) and LayerScales.
_KEY = re.compile(
    r"patch_embed\.proj\.(weight|bias)|pos_embed|pos_embed_window"
    r"|blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|blocks\.(\d+)\.(ls1|ls2)\.gamma"
    r"|head\.(norm|fc)\.(weight|bias)"  # timm's classifier head, kept only for a classifier
)
# Fields the tensors cannot show (heads, windows after the first, global blocks; also q_pool,
# q_stride, head_mul, which default as in timm): taken from the registered variant whose
# visible fields match, else these must be passed to `infer_config`.
_REQUIRED_WITHOUT_VARIANT = ("num_heads", "window_spec", "global_att_blocks")


# ---------------------------------------------------------------------- key formats
def timm_trunk_items(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(timm trunk key -> tensor, unknown source keys) for a timm, SAM 2 or transformers state dict.

    Accepts SAM 2 checkpoints (`{"model": ...}`, keys `image_encoder.trunk.*`; every other
    key is skipped), a SAM 2 `Hiera` state dict (no prefix, `mlp.layers.N`), timm's (its
    `head.*` is skipped) and transformers' (`Sam2HieraDetModel`; `Sam2VisionModel`, whose
    `neck.*` is skipped; `Sam2Model`, whose `vision_encoder.neck.*` and `TRANSFORMERS_NON_VISION`
    are skipped). Tensors are not read.
    """
    items, unknown, _ = _trunk_items(state_dict)
    return items, unknown


def _trunk_sources(state_dict: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """({key relative to the trunk: source key}, unknown source keys) for any accepted layout."""
    keys = list(state_dict)
    if any(k.startswith(SAM2_PREFIX) for k in keys):  # a whole SAM 2 model: the rest is skipped
        return {k.removeprefix(SAM2_PREFIX): k for k in keys if k.startswith(SAM2_PREFIX)}, []
    full = TRANSFORMERS_PREFIX + TRANSFORMERS_TRUNK
    if any(k.startswith(full) for k in keys):  # transformers' Sam2Model / Sam2VideoModel
        prefix, skipped = full, (TRANSFORMERS_PREFIX + TRANSFORMERS_NECK,)
    elif any(k.startswith(TRANSFORMERS_TRUNK) for k in keys):  # transformers' Sam2VisionModel
        prefix, skipped = TRANSFORMERS_TRUNK, (TRANSFORMERS_NECK,)
    else:
        return {k: k for k in keys}, []
    sources, unknown = {}, []
    for key in keys:
        if key.startswith(prefix):
            sources[key.removeprefix(prefix)] = key
        elif not (key.startswith(skipped) or _is_non_vision(key)):
            unknown.append(key)
    return sources, unknown


def _is_non_vision(key: str) -> bool:
    """A tensor of a transformers `Sam2Model` / `Sam2VideoModel` outside `vision_encoder`."""
    return key.partition(".")[0] in TRANSFORMERS_NON_VISION


def _trunk_items(
    state_dict: Mapping[str, Any], keep_head: bool = False
) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """`timm_trunk_items` plus {timm key: source key}, for error messages; `keep_head` keeps
    timm's classifier head (`head.norm`, `head.fc`) for `HieraDetForImageClassification`."""
    state_dict = unwrap_state_dict(state_dict)
    sources, unknown = _trunk_sources(state_dict)
    items, names = {}, {}
    for key, source in sources.items():
        if key.startswith("head.") and not keep_head:  # timm's classifier head: not the trunk
            continue
        renamed = key
        for timm_part, sam2_part in _TIMM_TO_SAM2:
            renamed = renamed.replace(sam2_part, timm_part)
        for timm_part, hf_part in _TIMM_TO_TRANSFORMERS:
            renamed = renamed.replace(hf_part, timm_part)
        if not _KEY.fullmatch(renamed):
            unknown.append(source)
        elif renamed in items:  # two layouts' names for one tensor
            unknown.append(f"{source} (a second {renamed}, after {names[renamed]})")
        else:
            items[renamed], names[renamed] = state_dict[source], source
    return items, unknown, names


def timm_to_flax_path(key: str) -> tuple[str, ...]:
    """`blocks.3.attn.qkv.weight` -> (`blocks_3`, `attn`, `qkv`, `weight`): the module path;
    `_flax_leaf` then names the leaf by the tensor's rank."""
    parts = key.split(".")
    if parts[0] == "blocks":
        parts = [f"blocks_{parts[1]}", *parts[2:]]
    return tuple(parts)


def _flax_leaf(path: tuple[str, ...], ndim: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(Flax path, axes to transpose the torch tensor by) for a renamed key of `ndim` dims."""
    if path[-1] in _TABLES:
        return path, (0, 2, 3, 1)  # NCHW -> NHWC
    if path[-1] == "weight":
        if ndim == 1:
            return (*path[:-1], "scale"), (0,)  # LayerNorm
        if ndim == 2:
            return (*path[:-1], "kernel"), (1, 0)  # Linear [out, in] -> [in, out]
        return (*path[:-1], "kernel"), (2, 3, 1, 0)  # Conv OIHW -> HWIO
    return path, tuple(range(ndim))


def _torch_leaf(path: tuple[str, ...], ndim: int) -> tuple[str, tuple[int, ...]]:
    """Inverse of `_flax_leaf`: (timm key, axes to transpose the Flax array by)."""
    parts = list(path)
    match = re.fullmatch(r"blocks_(\d+)", parts[0])
    if match:
        parts = ["blocks", match[1], *parts[1:]]
    axes = tuple(range(ndim))
    if parts[-1] in _TABLES:
        axes = (0, 3, 1, 2)
    elif parts[-1] == "scale":
        parts[-1] = "weight"
    elif parts[-1] == "kernel":
        parts[-1] = "weight"
        axes = (1, 0) if ndim == 2 else (3, 2, 0, 1)
    return ".".join(parts), axes


def _format_keys(keys, limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------- shapes
def abstract_params(config: HieraDetConfig, classifier: bool = False) -> dict:
    """Shapes of the Flax parameters (a tree of `jax.ShapeDtypeStruct`), allocating nothing:
    the trunk's, or with `classifier` those of `HieraDetForImageClassification`."""
    return _abstract_params(config, classifier)


@functools.lru_cache(maxsize=32)
def _abstract_params(config: HieraDetConfig, classifier: bool = False) -> dict:
    # The kernel switch changes no parameter; "xla" skips tracing the TPU kernels' branch.
    module = HieraDetForImageClassification if classifier else HieraDet
    model = module(config.replace(attention_kernel="xla", mlp_kernel="xla", remat=False))
    x = jax.ShapeDtypeStruct((1, *config.input_size, config.in_chans), jnp.float32)
    return jax.eval_shape(lambda key, x: model.init(key, x)["params"], jax.random.key(0), x)


def _plan(
    state_dict: Mapping[str, Any], config: HieraDetConfig, classifier: bool = False
) -> dict[tuple[str, ...], tuple[Any, tuple[int, ...]]]:
    """Flax path -> (source tensor, transpose axes), with every name and shape checked."""
    items, unused, names = _trunk_items(state_dict, keep_head=classifier)
    target = flax.traverse_util.flatten_dict(abstract_params(config, classifier))
    plan, mismatched = {}, []
    for key, value in items.items():
        shape = tuple(np.shape(value))
        path, axes = _flax_leaf(timm_to_flax_path(key), len(shape))
        if path not in target:
            unused.append(names[key])
            continue
        shape = tuple(shape[a] for a in axes)
        if shape != tuple(target[path].shape):
            source = "" if names[key] == key else f" (checkpoint key {names[key]})"
            mismatched.append(
                f"{key} -> {'/'.join(path)}: checkpoint {shape} (after layout change) vs "
                f"model {tuple(target[path].shape)}{source}"
            )
        plan[path] = (value, axes)
    missing = ["/".join(p) for p in target if p not in plan]
    problems = []
    if mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
    if unused:
        problems.append(
            f"{len(unused)} tensor(s) the trunk has no place for: {_format_keys(unused)}"
        )
    if missing:
        problems.append(
            f"{len(missing)} parameter(s) the checkpoint does not fill: {_format_keys(missing)}"
        )
    if problems:
        raise ValueError("state dict does not fit this HieraDet config:\n" + "\n".join(problems))
    return plan


def check_state_dict(state_dict: Mapping[str, Any], config: HieraDetConfig | str) -> None:
    """ValueError unless the state dict fills exactly the trunk of `config` (shapes only)."""
    _plan(state_dict, resolve_config(config))


def resolve_config(config: HieraDetConfig | str) -> HieraDetConfig:
    if isinstance(config, str):
        if config not in VARIANTS:
            raise ValueError(f"unknown HieraDet variant {config!r}; known: {', '.join(VARIANTS)}")
        return VARIANTS[config]
    return config


# ---------------------------------------------------------------------- conversion
def convert_state_dict(
    state_dict: Mapping[str, Any],
    config: HieraDetConfig | str | None = None,
    *,
    classifier: bool = False,
) -> dict:
    """Flax params (float32 NumPy) from a timm or SAM 2 state dict of torch tensors or arrays.

    `config` None infers it from the tensors (`infer_config`). `classifier`: the params of
    `HieraDetForImageClassification`, from a timm classifier (its `head.norm` / `head.fc` too).
    """
    config = infer_config(state_dict) if config is None else resolve_config(config)
    plan = _plan(state_dict, config, classifier)
    flat = {
        path: np.ascontiguousarray(to_numpy(value).astype(np.float32, copy=False).transpose(axes))
        for path, (value, axes) in plan.items()
    }
    return flax.traverse_util.unflatten_dict(flat)


def export_state_dict(
    params: Mapping[str, Any], config: HieraDetConfig | str, *, format: str = "timm"
) -> dict[str, np.ndarray]:
    """A torch-layout state dict (float32 NumPy) for Flax params, checked against the model.

    `format="timm"`: timm's keys (load a trunk into `timm.create_model("sam2_hiera_*")` with
    `strict=False`: its classifier head is not here; `HieraDetForImageClassification` params,
    `head` included, load with `strict=True` into one built with their `num_classes`). `format="sam2"`: SAM 2's keys
    (`image_encoder.trunk.*`, `mlp.layers.N`), one part of a SAM 2 model's state dict.
    `format="transformers"`: transformers' `Sam2HieraDetModel` keys (`patch_embed.projection`,
    `layer_norm1`, `mlp.proj_in`; no prefix), which it loads with `strict=True`; a
    `Sam2VisionModel` has them under `backbone.`, a `Sam2Model` under `vision_encoder.backbone.`.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    config = resolve_config(config)
    params = params.get("params", params) if isinstance(params, Mapping) else params
    classifier = "head" in params  # HieraDetForImageClassification: timm's head.norm / head.fc
    if classifier and format != "timm":
        raise ValueError(
            f"{format!r} checkpoints have no classifier head: export the trunk (the params "
            "without 'head') or use format='timm'"
        )
    flat = check_params_fit(params, abstract_params(config, classifier), "this HieraDet config")
    out = {}
    for path, value in flat.items():
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        key, axes = _torch_leaf(path, array.ndim)
        if format == "sam2":
            for timm_part, sam2_part in _TIMM_TO_SAM2:
                key = key.replace(timm_part, sam2_part)
            key = SAM2_PREFIX + key
        elif format == "transformers":
            for timm_part, hf_part in _TIMM_TO_TRANSFORMERS:
                key = key.replace(timm_part, hf_part)
        out[key] = np.ascontiguousarray(array.transpose(axes))  # torch.from_numpy takes it
    return out


# ---------------------------------------------------------------------- config inference
def infer_config(state_dict: Mapping[str, Any], **overrides: Any) -> HieraDetConfig:
    """The config a timm or SAM 2 trunk state dict was built with, as far as its shapes tell.

    Read from the tensors: embed_dim, in_chans, patch_kernel, stages (the width projections
    mark where a stage starts), dim_mul, mlp_ratio, global_pos_size, window_spec[0] and
    LayerScale. Heads, later windows, global blocks and pooling leave no trace in the tensors:
    they come from the registered variant with the same visible fields, else from `overrides`
    (num_heads, window_spec and global_att_blocks are then required). `overrides` always win.
    """
    items, unknown = timm_trunk_items(state_dict)
    if unknown:
        raise ValueError(f"not HieraDet trunk tensors: {_format_keys(unknown)}")
    shapes = {k: tuple(np.shape(v)) for k, v in items.items()}
    if not {"patch_embed.proj.weight", "pos_embed", "pos_embed_window"} <= set(shapes):
        raise ValueError("no HieraDet trunk in this state dict (no patch_embed / pos_embed_window)")
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"the blocks are not numbered 0..n-1: {blocks}")
    embed_dim, in_chans, *kernel = shapes["patch_embed.proj.weight"]
    starts = [i for i in blocks if f"blocks.{i}.proj.weight" in shapes]  # width changes
    bounds = [0, *starts, len(blocks)]
    stages = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if 0 in stages:
        raise ValueError(f"block 0 changes width: {starts} do not start stages")
    muls = {
        shapes[f"blocks.{i}.proj.weight"][0] / shapes[f"blocks.{i}.proj.weight"][1] for i in starts
    }
    if len(muls) > 1:
        raise ValueError(f"the width grows by different factors {sorted(muls)} at stage changes")
    if "blocks.0.mlp.fc1.weight" not in shapes:
        raise ValueError("block 0 has no mlp.fc1.weight")
    hidden, first_dim = shapes["blocks.0.mlp.fc1.weight"]
    visible = dict(
        embed_dim=embed_dim,
        in_chans=in_chans,
        patch_kernel=tuple(kernel),
        stages=stages,
        dim_mul=muls.pop() if muls else 2.0,
        mlp_ratio=hidden / first_dim,
        global_pos_size=shapes["pos_embed"][2:],
        # Any value gives the same parameters; timm's hieradet_small uses 1e-5.
        init_values=1e-5 if "blocks.0.ls1.gamma" in shapes else None,
    )
    first_window = shapes["pos_embed_window"][2]
    matches = [
        cfg
        for cfg in VARIANTS.values()
        if all(getattr(cfg, k) == v for k, v in visible.items() if k != "in_chans")
        and cfg.window_spec[0] == first_window
    ]
    base = matches[0] if matches else HieraDetConfig()
    if not matches:
        lacking = [f for f in _REQUIRED_WITHOUT_VARIANT if f not in overrides]
        if lacking:
            raise ValueError(
                f"the tensors match no registered variant ({', '.join(VARIANTS)}), and "
                f"{', '.join(lacking)} cannot be read from them: pass them to infer_config"
            )
    fields = {f.name for f in dataclasses.fields(HieraDetConfig)}
    if unknown_fields := set(overrides) - fields:
        raise ValueError(f"unknown HieraDetConfig fields {sorted(unknown_fields)}")
    config = dataclasses.replace(base, **{**visible, **overrides})
    if config.window_spec[0] != first_window:
        raise ValueError(
            f"window_spec {config.window_spec} does not start with the {first_window}x"
            f"{first_window} window table of the checkpoint"
        )
    return config


# ---------------------------------------------------------------------- image encoder (+ neck)
def _abstract_encoder_params(trunk: HieraDetConfig, neck: FpnNeckConfig) -> dict:
    model = ImageEncoder(trunk.replace(attention_kernel="xla", mlp_kernel="xla"), neck)
    x = jax.ShapeDtypeStruct((1, *trunk.input_size, trunk.in_chans), jnp.float32)
    return jax.eval_shape(lambda key, x: model.init(key, x)["params"], jax.random.key(0), x)


def _encoder_parts(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], re.Pattern]:
    """(trunk tensors, neck tensors, the neck's key pattern) of a SAM 2 or transformers encoder.

    SAM 2: `image_encoder.{trunk,neck}.*` (a whole model; the rest skipped) or `{trunk,neck}.*`.
    transformers: `vision_encoder.{backbone,neck}.*` (a whole `Sam2Model`, whose
    `TRANSFORMERS_NON_VISION` are skipped) or `{backbone,neck}.*` (a `Sam2VisionModel`). Neck
    keys keep their `neck.` prefix, for error messages.
    """
    state_dict = unwrap_state_dict(state_dict)
    keys = list(state_dict)
    if any(k.startswith(TRANSFORMERS_PREFIX) for k in keys):
        unknown = [
            k for k in keys if not k.startswith(TRANSFORMERS_PREFIX) and not _is_non_vision(k)
        ]
        if unknown:
            raise ValueError(
                "not tensors of a transformers Sam2Model (vision_encoder.*, or the skipped "
                f"{', '.join(TRANSFORMERS_NON_VISION)}): {_format_keys(unknown)}"
            )
        state_dict = {
            k.removeprefix(TRANSFORMERS_PREFIX): v
            for k, v in state_dict.items()
            if k.startswith(TRANSFORMERS_PREFIX)
        }
        hf = True
    else:
        hf = any(k.startswith(TRANSFORMERS_TRUNK) for k in keys)
        if not hf and any(k.startswith(ENCODER_PREFIX) for k in keys):
            state_dict = {
                k.removeprefix(ENCODER_PREFIX): v
                for k, v in state_dict.items()
                if k.startswith(ENCODER_PREFIX)
            }
    trunk_part = TRANSFORMERS_TRUNK if hf else "trunk."
    trunk, neck, unknown = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith(trunk_part):
            trunk[key.removeprefix(trunk_part)] = value
        elif key.startswith(TRANSFORMERS_NECK):
            neck[key] = value
        else:
            unknown.append(key)
    if unknown:
        parts = "backbone.*, neck.* (transformers)" if hf else "trunk.*, neck.*"
        raise ValueError(f"not image-encoder tensors ({parts}): {_format_keys(unknown)}")
    return trunk, neck, _HF_NECK_KEY if hf else _NECK_KEY


def convert_image_encoder_state_dict(
    state_dict: Mapping[str, Any],
    trunk: HieraDetConfig | str | None = None,
    neck: FpnNeckConfig | None = None,
) -> dict:
    """Params of `hieradet_neck.ImageEncoder` ({"trunk", "neck"}) from a SAM 2 or transformers
    checkpoint.

    Takes a whole SAM 2 model (`{"model": ...}`, keys `image_encoder.*`; the rest is skipped),
    an `ImageEncoder` state dict (`trunk.*`, `neck.*`), transformers' `Sam2VisionModel`
    (`backbone.*`, `neck.*`) or a whole `Sam2Model` / `Sam2VideoModel` (`vision_encoder.*`; the
    `TRANSFORMERS_NON_VISION` tensors are skipped, any other key is a ValueError). `trunk` None
    infers the trunk; for transformers, `configs_from_transformers(config)` gives both configs.
    """
    trunk_sd, neck_sd, neck_key = _encoder_parts(state_dict)
    trunk_params = convert_state_dict(trunk_sd, trunk)
    trunk = infer_config(trunk_sd) if trunk is None else resolve_config(trunk)
    neck = FpnNeckConfig() if neck is None else neck
    target = flax.traverse_util.flatten_dict(_abstract_encoder_params(trunk, neck)["neck"])
    flat, unused = {}, []
    for key, value in neck_sd.items():
        match = neck_key.fullmatch(key.removeprefix(TRANSFORMERS_NECK))
        if not match:
            unused.append(key)
            continue
        array = to_numpy(value).astype(np.float32, copy=False)
        if match[2] == "weight":
            path, array = (f"convs_{match[1]}", "kernel"), array.transpose(2, 3, 1, 0)
        else:
            path = (f"convs_{match[1]}", "bias")
        if path not in target or array.shape != tuple(target[path].shape):
            unused.append(f"{key} {tuple(np.shape(value))}")
            continue
        flat[path] = np.ascontiguousarray(array)
    missing = ["/".join(p) for p in target if p not in flat]
    if unused or missing:
        raise ValueError(
            f"the neck tensors do not fit FpnNeck({neck}) on this trunk: no place for "
            f"{_format_keys(unused)}; not filled: {_format_keys(missing)}"
        )
    return {"trunk": trunk_params, "neck": flax.traverse_util.unflatten_dict(flat)}


def export_image_encoder_state_dict(
    params: Mapping[str, Any],
    trunk: HieraDetConfig | str,
    neck: FpnNeckConfig | None = None,
    *,
    format: str = "sam2",
) -> dict[str, np.ndarray]:
    """A torch-layout state dict (float32 NumPy) for `ImageEncoder` params.

    `format="sam2"`: SAM 2's `image_encoder.*` keys, one part of a SAM 2 model's state dict.
    `format="transformers"`: transformers' `Sam2VisionModel` keys (`backbone.*`, `neck.convs.N.*`),
    which it loads with `strict=True` (a `Sam2Model` has them under `vision_encoder.`); its
    config is `transformers_vision_config(trunk, neck)`.
    """
    if format not in ("sam2", "transformers"):
        raise ValueError(f"format must be one of ('sam2', 'transformers'), got {format!r}")
    trunk = resolve_config(trunk)
    neck = FpnNeckConfig() if neck is None else neck
    params = params.get("params", params)
    target = _abstract_encoder_params(trunk, neck)
    check_params_fit(params["neck"], target["neck"], "this FpnNeck")
    if format == "sam2":
        out = export_state_dict(params["trunk"], trunk, format="sam2")  # image_encoder.trunk.*
        conv_key = ENCODER_PREFIX + "neck.convs.{}.conv.{}"
    else:
        trunk_sd = export_state_dict(params["trunk"], trunk, format="transformers")
        out = {TRANSFORMERS_TRUNK + k: v for k, v in trunk_sd.items()}
        conv_key = TRANSFORMERS_NECK + "convs.{}.{}"
    for (conv, leaf), value in flax.traverse_util.flatten_dict(dict(params["neck"])).items():
        array = np.asarray(jax.device_get(value), dtype=np.float32)
        index = conv.removeprefix("convs_")
        if leaf == "kernel":
            out[conv_key.format(index, "weight")] = np.ascontiguousarray(
                array.transpose(3, 2, 0, 1)
            )
        else:
            out[conv_key.format(index, "bias")] = array.copy()
    return out
