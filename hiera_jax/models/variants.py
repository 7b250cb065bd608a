"""The registry of official Hiera variants (image and video, classifier and MAE) and timm's
abs-win ones, by name."""

from __future__ import annotations

from typing import Any

from hiera_jax.models.config import HieraConfig
from hiera_jax.models.hf_names import HF_ALIASES

_IN1K = dict(num_classes=1000)  # the official constructor's default (transformers': 2)
_IMAGE = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), **_IN1K),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), **_IN1K),
    "base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3), **_IN1K),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), **_IN1K),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), **_IN1K),
    "huge": dict(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4), **_IN1K),
}
_VIDEO_INPUT = dict(
    num_classes=400,  # Kinetics-400
    input_size=(16, 224, 224),
    q_stride=(1, 2, 2),
    mask_unit_size=(1, 8, 8),
    patch_kernel=(3, 7, 7),
    patch_stride=(2, 4, 4),
    patch_padding=(1, 3, 3),
    sep_pos_embed=True,
    mask_ratio=0.9,
)
# The official MAE models pool twice (the classifiers three times), with the official decoder.
_MAE = dict(q_pool=2, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def _build_variants() -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {}
    for size, kw in _IMAGE.items():
        variants[f"hiera_{size}_224"] = dict(kw)
        variants[f"mae_hiera_{size}_224"] = dict(kw, **_MAE)
    for size in ("base", "base_plus", "large", "huge"):
        variants[f"hiera_{size}_16x224"] = dict(_IMAGE[size], **_VIDEO_INPUT)
        variants[f"mae_hiera_{size}_16x224"] = dict(_IMAGE[size], **_VIDEO_INPUT, **_MAE)
    return variants


VARIANTS: dict[str, dict[str, Any]] = _build_variants()

# Variants that only timm defines (`timm.models.hiera`), with timm's kwargs and input size.
# Kept apart from VARIANTS (the official models): no official checkpoint or module exists.
TIMM_VARIANTS: dict[str, dict[str, Any]] = {
    "hiera_small_abswin_256": dict(
        _IMAGE["small"],
        input_size=(256, 256),
        abs_win_pos_embed=True,
        global_pos_size=(16, 16),
        init_values=1e-5,
        weight_init="jax",
        use_expand_proj=False,
    ),
    "hiera_base_abswin_256": dict(
        _IMAGE["base"],
        input_size=(256, 256),
        abs_win_pos_embed=True,
        init_values=1e-5,
        weight_init="jax",
    ),
}


def list_models(include_timm: bool = False) -> list[str]:
    """Names of every official variant, classification (`hiera_*`) and MAE (`mae_hiera_*`).

    `include_timm=True` adds the timm-only variants (`hiera_{small,base}_abswin_256`).
    """
    return sorted({**VARIANTS, **TIMM_VARIANTS} if include_timm else VARIANTS)


def is_pretraining_name(name: str) -> bool:
    return name.startswith("mae_")


def get_config(name: str, **overrides: Any) -> HieraConfig:
    """The config of an official variant, with explicit keyword overrides applied on top.

    Overrides may use either vocabulary (`num_query_pool=1` or `q_pool=1`).
    """
    variants = {**VARIANTS, **TIMM_VARIANTS}
    if name not in variants:
        known = ", ".join(list_models(include_timm=True))
        raise ValueError(f"unknown model name {name!r}; known models: {known}")
    base = dict(variants[name])
    for key in overrides:  # an override under either name replaces the variant's value
        base.pop(HF_ALIASES.get(key, key), None)
    return HieraConfig(**base, **overrides)


def resolve_config(name_or_config: str | HieraConfig, **overrides: Any) -> HieraConfig:
    if isinstance(name_or_config, HieraConfig):
        return name_or_config.replace(**overrides) if overrides else name_or_config
    return get_config(name_or_config, **overrides)
