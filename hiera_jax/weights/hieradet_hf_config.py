"""transformers' SAM 2 configs <-> ours: `configs_from_transformers` reads a `Sam2VisionConfig`
(or config.json's `vision_config`, or a `Sam2HieraDetConfig`) into (HieraDetConfig,
FpnNeckConfig), and `transformers_vision_config` writes one back. The key maps of the tensors are
`hieradet_convert`'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hiera_jax.models.hieradet import (
    HieraDetConfig,
)
from hiera_jax.models.hieradet_neck import FpnNeckConfig
from hiera_jax.weights.hieradet_convert import resolve_config

# ---------------------------------------------------------------------- transformers configs
# The defaults of transformers' `Sam2HieraDetConfig` and `Sam2VisionConfig` (5.23, their
# `__post_init__`): a config.json written with only the differences from them fills in from here.
TRANSFORMERS_TRUNK_DEFAULTS: dict[str, Any] = dict(
    hidden_size=96,
    num_channels=3,
    image_size=[1024, 1024],
    patch_kernel_size=[7, 7],
    patch_stride=[4, 4],
    patch_padding=[3, 3],
    query_stride=[2, 2],
    window_positional_embedding_background_size=[7, 7],
    num_query_pool_stages=3,
    blocks_per_stage=[1, 2, 7, 2],
    embed_dim_per_stage=[96, 192, 384, 768],
    num_attention_heads_per_stage=[1, 2, 4, 8],
    window_size_per_stage=[8, 4, 14, 7],
    global_attention_blocks=[5, 7, 9],
    mlp_ratio=4.0,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
)
TRANSFORMERS_VISION_DEFAULTS: dict[str, Any] = dict(
    backbone_channel_list=[768, 384, 192, 96],
    backbone_feature_sizes=[[256, 256], [128, 128], [64, 64]],
    fpn_hidden_size=256,
    fpn_kernel_size=1,
    fpn_stride=1,
    fpn_padding=0,
    fpn_top_down_levels=[2, 3],
    num_feature_levels=3,
)
_TRUNK_TYPE, _VISION_TYPE, _MODEL_TYPES = (
    "sam2_hiera_det_model",
    "sam2_vision_model",
    ("sam2", "sam2_video"),
)


def _as_dict(config: Any, what: str) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PreTrainedConfig
        return config.to_dict()
    raise ValueError(
        f"{what} must be a transformers config or its dict, got {type(config).__name__}"
    )


def _transformers_sections(config: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(vision-config dict, or None for a bare backbone config; backbone-config dict).

    Takes a `Sam2Config` / `Sam2VideoConfig` (its `vision_config`), a `Sam2VisionConfig`, a
    `Sam2HieraDetConfig`, or the dict of any of them (config.json, whole or any section).
    """
    d = _as_dict(config, "config")
    kind = d.get("model_type")
    if kind in _MODEL_TYPES or (kind is None and "vision_config" in d):
        d = _as_dict(d.get("vision_config"), "vision_config")
        kind = d.get("model_type", _VISION_TYPE)
    known = (*_MODEL_TYPES, _VISION_TYPE, _TRUNK_TYPE)
    if kind is not None and kind not in known:
        raise ValueError(
            f"model_type {kind!r} is not a transformers SAM 2 config (one of {', '.join(known)})"
        )
    if kind is None:  # a bare dict: its keys tell
        trunk_keys = (set(d) & set(TRANSFORMERS_TRUNK_DEFAULTS)) - {"hidden_act", "layer_norm_eps"}
        vision_keys = set(d) & {"backbone_config", *TRANSFORMERS_VISION_DEFAULTS}
        if trunk_keys and vision_keys:
            raise ValueError(
                f"the dict mixes Sam2HieraDetConfig fields {sorted(trunk_keys)} with "
                f"Sam2VisionConfig fields {sorted(vision_keys)}: nest the former under "
                "backbone_config"
            )
        kind = _TRUNK_TYPE if trunk_keys else _VISION_TYPE
    if kind == _TRUNK_TYPE:
        return None, d
    backbone = _as_dict(d.get("backbone_config"), "backbone_config")
    if backbone.get("model_type", _TRUNK_TYPE) != _TRUNK_TYPE:
        raise ValueError(
            f"backbone_config has model_type {backbone['model_type']!r}: only SAM 2's HieraDet "
            f"({_TRUNK_TYPE!r}) is supported"
        )
    return d, backbone


def _filled(d: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' defaults where the dict has no value (a None means the default there too)."""
    return {**defaults, **{k: v for k, v in d.items() if k in defaults and v is not None}}


def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(value)
    raise ValueError(f"{name} must be an integer or a pair, got {value!r}")


def _geometric(name: str, values: list[Any], mul_name: str) -> float:
    """The factor by which `values` grows at every stage change, as HieraDetConfig derives it."""
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be positive integers, got {list(values)}")
    if len(values) < 2:
        return 2.0
    mul = values[1] / values[0]
    derived = [values[0]]
    for _ in values[1:]:
        derived.append(int(derived[-1] * mul))
    if derived != list(values):
        raise ValueError(
            f"{name} {list(values)} does not grow by one factor at every stage change: "
            f"HieraDetConfig derives them from the first stage's and {mul_name}"
        )
    return mul


def trunk_config_from_transformers(config: Any) -> HieraDetConfig:
    """The HieraDetConfig of a transformers `Sam2HieraDetConfig` (or of the `backbone_config` of
    a `Sam2VisionConfig` / `Sam2Config`), or of its dict; ValueError for what HieraDet cannot run
    as transformers does."""
    _, backbone = _transformers_sections(config)
    c = _filled(backbone, TRANSFORMERS_TRUNK_DEFAULTS)
    if c["hidden_act"] != "gelu":
        raise ValueError(
            f"hidden_act={c['hidden_act']!r}: HieraDet's MLP is the exact (erf) GELU, "
            "transformers' 'gelu'"
        )
    lists = {
        name: list(c[name])
        for name in (
            "blocks_per_stage",
            "embed_dim_per_stage",
            "num_attention_heads_per_stage",
            "window_size_per_stage",
        )
    }
    n = len(lists["blocks_per_stage"])
    if any(len(v) != n for v in lists.values()):
        raise ValueError(
            f"{', '.join(lists)} must have one entry per stage: got lengths "
            f"{[len(v) for v in lists.values()]}"
        )
    dims, heads = lists["embed_dim_per_stage"], lists["num_attention_heads_per_stage"]
    if n and dims[0] != c["hidden_size"]:
        raise ValueError(
            f"hidden_size={c['hidden_size']} (the patch embedding's width) differs from "
            f"embed_dim_per_stage[0]={dims[0]} (the first block's): transformers cannot run it either"
        )
    q_stride = _pair("query_stride", c["query_stride"])
    if q_stride[0] != q_stride[1]:
        raise ValueError(
            f"query_stride={list(q_stride)}: transformers unpartitions the pooled windows with "
            "query_stride[0] on both sides, so only a square stride runs the same"
        )
    q_pool = c["num_query_pool_stages"]
    if isinstance(q_pool, bool) or not isinstance(q_pool, int):
        raise ValueError(f"num_query_pool_stages must be an integer, got {q_pool!r}")
    try:
        return HieraDetConfig(
            embed_dim=c["hidden_size"],
            num_heads=heads[0] if heads else 1,
            stages=tuple(lists["blocks_per_stage"]),
            # transformers pools where 0 < stage <= num_query_pool_stages: clip to the changes.
            q_pool=min(max(q_pool, 0), max(n - 1, 0)),
            q_stride=q_stride,
            dim_mul=_geometric("embed_dim_per_stage", dims, "dim_mul"),
            head_mul=_geometric("num_attention_heads_per_stage", heads, "head_mul"),
            window_spec=tuple(lists["window_size_per_stage"]),
            global_att_blocks=tuple(c["global_attention_blocks"]),
            global_pos_size=_pair(
                "window_positional_embedding_background_size",
                c["window_positional_embedding_background_size"],
            ),
            mlp_ratio=float(c["mlp_ratio"]),
            in_chans=c["num_channels"],
            input_size=_pair("image_size", c["image_size"]),
            patch_kernel=_pair("patch_kernel_size", c["patch_kernel_size"]),
            patch_stride=_pair("patch_stride", c["patch_stride"]),
            patch_padding=_pair("patch_padding", c["patch_padding"]),
            layer_norm_eps=float(c["layer_norm_eps"]),
        )
    except ValueError as err:
        raise ValueError(
            f"this transformers Sam2HieraDetConfig has no HieraDet equal: {err}"
        ) from err


def configs_from_transformers(config: Any) -> tuple[HieraDetConfig, FpnNeckConfig]:
    """(HieraDetConfig, FpnNeckConfig) of a transformers `Sam2VisionConfig` (or a `Sam2Config`'s
    `vision_config`), or of its dict (config.json, whole or its `vision_config`).

    transformers' neck always fuses by nearest upsampling and a sum, with a normalised sine
    encoding of `fpn_hidden_size // 2` features per axis; `num_feature_levels` keeps the finest
    levels, so `scalp` is the number of stages minus it. `backbone_feature_sizes` is only read by
    `Sam2Model` (to reshape the image embeddings) and is not checked here.
    """
    vision, _ = _transformers_sections(config)
    if vision is None:
        raise ValueError(
            "a Sam2HieraDetConfig holds no neck settings: pass the Sam2VisionConfig, or use "
            "trunk_config_from_transformers for the trunk alone"
        )
    trunk = trunk_config_from_transformers(config)
    c = _filled(vision, TRANSFORMERS_VISION_DEFAULTS)
    levels = len(trunk.stages)
    channels = list(trunk.stage_dims[::-1])
    if list(c["backbone_channel_list"]) != channels:
        raise ValueError(
            f"backbone_channel_list {list(c['backbone_channel_list'])} is not the trunk's stage "
            f"widths, coarsest first: {channels}"
        )
    kept = c["num_feature_levels"]
    if isinstance(kept, bool) or not isinstance(kept, int) or kept < 1:
        raise ValueError(
            f"num_feature_levels must be a positive integer, got {kept!r} (transformers' slice "
            "[-0:] would keep every level for 0)"
        )
    width = c["fpn_hidden_size"]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"fpn_hidden_size must be a positive integer, got {width!r}")
    top_down = c["fpn_top_down_levels"]
    try:
        neck = FpnNeckConfig(
            d_model=width,
            kernel_size=c["fpn_kernel_size"],
            stride=c["fpn_stride"],
            padding=c["fpn_padding"],
            fpn_interp_model="nearest",
            fuse_type="sum",
            fpn_top_down_levels=tuple(top_down),
            scalp=max(levels - kept, 0),
            num_pos_feats=2 * (width // 2),
            temperature=10000.0,
            normalize=True,
            scale=None,
        )
    except ValueError as err:
        raise ValueError(f"this transformers Sam2VisionConfig has no FpnNeck equal: {err}") from err
    return trunk, neck


def transformers_vision_config(
    trunk: HieraDetConfig | str, neck: FpnNeckConfig | None = None
) -> dict[str, Any]:
    """transformers' `Sam2VisionConfig` fields (its `backbone_config` a dict) for our configs:
    `transformers.Sam2VisionConfig(**transformers_vision_config(...))`. `backbone_feature_sizes`
    are the kept levels' grids at `trunk.input_size`. ValueError for settings transformers'
    modules do not have."""
    trunk = resolve_config(trunk)
    neck = FpnNeckConfig() if neck is None else neck
    problems = []
    if trunk.init_values is not None:
        problems.append("LayerScale (init_values): transformers' blocks have none")
    if trunk.q_stride[0] != trunk.q_stride[1]:
        problems.append(f"q_stride {trunk.q_stride}: transformers runs square strides only")
    if neck.fpn_interp_model != "nearest" or neck.fuse_type != "sum":
        problems.append(
            f"fpn_interp_model={neck.fpn_interp_model!r}, fuse_type={neck.fuse_type!r}: "
            "transformers' neck is 'nearest' and 'sum'"
        )
    if (neck.num_pos_feats, neck.temperature, neck.normalize, neck.scale) != (
        2 * (neck.d_model // 2),
        10000.0,
        True,
        None,
    ):
        problems.append(
            "the sine encoding: transformers' has num_pos_feats = 2 * (d_model // 2), "
            f"temperature 10000, normalize=True, scale None; got {neck.num_pos_feats}, "
            f"{neck.temperature}, {neck.normalize}, {neck.scale}"
        )
    levels = len(trunk.stages)
    if neck.scalp >= levels:
        problems.append(f"scalp={neck.scalp} drops all {levels} levels")
    if problems:
        raise ValueError(
            "no transformers Sam2VisionConfig for this encoder: " + "; ".join(problems)
        )
    specs = trunk.block_specs
    backbone = dict(
        model_type=_TRUNK_TYPE,
        hidden_size=trunk.embed_dim,
        num_attention_heads=trunk.num_heads,
        num_channels=trunk.in_chans,
        image_size=list(trunk.input_size),
        patch_kernel_size=list(trunk.patch_kernel),
        patch_stride=list(trunk.patch_stride),
        patch_padding=list(trunk.patch_padding),
        query_stride=list(trunk.q_stride),
        window_positional_embedding_background_size=list(trunk.global_pos_size),
        num_query_pool_stages=trunk.q_pool,
        blocks_per_stage=list(trunk.stages),
        embed_dim_per_stage=list(trunk.stage_dims),
        num_attention_heads_per_stage=[specs[end].heads for end in trunk.stage_ends],
        window_size_per_stage=list(trunk.window_spec),
        global_attention_blocks=list(trunk.global_att_blocks),
        mlp_ratio=trunk.mlp_ratio,
        hidden_act="gelu",
        layer_norm_eps=trunk.layer_norm_eps,
    )
    kept = levels - neck.scalp
    top_down = range(levels) if neck.fpn_top_down_levels is None else neck.fpn_top_down_levels
    return dict(
        backbone_config=backbone,
        backbone_channel_list=list(trunk.stage_dims[::-1]),
        backbone_feature_sizes=[list(g) for g in trunk.stage_grids(trunk.input_size)[:kept]],
        fpn_hidden_size=neck.d_model,
        fpn_kernel_size=neck.kernel_size,
        fpn_stride=neck.stride,
        fpn_padding=neck.padding,
        fpn_top_down_levels=list(top_down),
        num_feature_levels=kept,
    )
