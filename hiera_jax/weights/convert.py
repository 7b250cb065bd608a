"""PyTorch state dicts (official `.pth`, timm, Hugging Face) <-> Flax params.

The three PyTorch formats differ only by key names (`../shared/HIERA_REFERENCE.md` §2), so every
source is first renamed to the official keys, then one rule maps official keys to Flax paths:
`blocks.3.attn.qkv.weight` -> `blocks_3/attn/qkv/kernel` (transposed). Nothing is dropped
silently: a source tensor no parameter takes, a parameter no tensor fills, or a shape that
does not fit raises ValueError listing every such key. Export goes the other way, to the
official keys or to transformers' (`format="hf"`: `hiera.encoder.stages.0.layers.0...`, the
keys its `HieraModel` / `HieraForImageClassification` / `HieraForPreTraining` /
`HieraBackbone` load).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from hiera_jax.models.config import HieraConfig
from hiera_jax.models.factory import abstract_params, model_type_for
from hiera_jax.models.variants import resolve_config

SOURCES = ("official", "timm", "hf")
_INDEXED_MODULES = ("blocks", "decoder_blocks", "multi_scale_fusion_heads")
_ABSWIN_TABLES = ("pos_embed", "pos_embed_win")  # 4-D only in timm's abswin models


# ---------------------------------------------------------------------- source formats
def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Official `.pth` files store `{"model_state": state_dict}`; accept both forms."""
    for wrapper in ("model_state", "model", "state_dict"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            return inner
    return state_dict


def detect_source(keys) -> str:
    keys = list(keys)
    if any(
        k.startswith(("hiera.", "embeddings.", "encoder.stages.", "decoder.decoder_")) for k in keys
    ):
        return "hf"
    if any(k.startswith(("head.fc.", "head.norm.")) for k in keys):
        return "timm"
    return "official"


_HF_BLOCK_PARTS = {"layernorm_before": "norm1", "layernorm_after": "norm2"}
_HF_RULES = [
    (r"embeddings\.patch_embeddings\.projection\.(.+)", r"patch_embed.proj.\1"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"pooler\.layernorm\.(.+)", r"norm.\1"),
    (r"classifier\.(.+)", r"head.projection.\1"),
    (
        r"multiscale_fusion\.multi_scale_fusion_heads\.(\d+)\.(.+)",
        r"multi_scale_fusion_heads.\1.\2",
    ),
    (r"decoder\.decoder_embeddings\.(.+)", r"decoder_embed.\1"),
    (r"decoder\.mask_token", "mask_token"),
    (r"decoder\.decoder_position_embeddings", "decoder_pos_embed"),
    (r"decoder\.decoder_norm\.(.+)", r"decoder_norm.\1"),
    (r"decoder\.decoder_pred\.(.+)", r"decoder_pred.\1"),
    (r"encoder_norm\.(.+)", r"encoder_norm.\1"),
    (r"hidden_states_norms\.(.+)", r"hidden_states_norms.\1"),  # HieraBackbone
]
EXPORT_FORMATS = ("official", "hf")


def _rename_block_part(rest: str, table: Mapping[str, str]) -> str:
    """`layernorm_before.weight` -> `norm1.weight` (or back): the first part renamed by `table`."""
    head, _, tail = rest.partition(".")
    head = table.get(head, head)
    return f"{head}.{tail}" if tail else head


def hf_to_official_key(key: str, config: HieraConfig) -> str | None:
    """One Hugging Face key -> official key; None if no rule applies (reported as unused)."""
    key = key.removeprefix("hiera.")
    match = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key)
    if match:
        stage, layer = int(match[1]), int(match[2])
        if stage >= len(config.stages) or layer >= config.stages[stage]:
            return None
        block = sum(config.stages[:stage]) + layer
        return f"blocks.{block}.{_rename_block_part(match[3], _HF_BLOCK_PARTS)}"
    match = re.fullmatch(r"decoder\.decoder_block\.layers\.(\d+)\.(.+)", key)
    if match:
        return f"decoder_blocks.{match[1]}.{_rename_block_part(match[2], _HF_BLOCK_PARTS)}"
    for pattern, replacement in _HF_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


_OFFICIAL_TO_HF_BLOCK = {ours: theirs for theirs, ours in _HF_BLOCK_PARTS.items()}
# Official key (a regex) -> transformers' key; `{p}` is "hiera." where transformers nests the
# encoder under `self.hiera` (classifier and MAE), "" for HieraModel and HieraBackbone.
_OFFICIAL_TO_HF = [
    (r"patch_embed\.proj\.(.+)", r"{p}embeddings.patch_embeddings.projection.\1"),
    (r"pos_embed", r"{p}embeddings.position_embeddings"),
    (r"norm\.(.+)", r"{p}pooler.layernorm.\1"),
    (r"head\.projection\.(.+)", r"classifier.\1"),
    (r"encoder_norm\.(.+)", r"encoder_norm.\1"),
    (r"multi_scale_fusion_heads\.(\d+)\.(.+)", r"multiscale_fusion.multi_scale_fusion_heads.\1.\2"),
    (r"mask_token", r"decoder.mask_token"),
    (r"decoder_pos_embed", r"decoder.decoder_position_embeddings"),
    (r"decoder_embed\.(.+)", r"decoder.decoder_embeddings.\1"),
    (r"decoder_norm\.(.+)", r"decoder.decoder_norm.\1"),
    (r"decoder_pred\.(.+)", r"decoder.decoder_pred.\1"),
    (r"hidden_states_norms\.(.+)", r"hidden_states_norms.\1"),
]


def official_to_hf_key(key: str, config: HieraConfig, model_type: str) -> str:
    """One official key -> transformers' key for the class of `model_type` (inverse of
    `hf_to_official_key`)."""
    prefix = "hiera." if model_type in ("classification", "pretraining") else ""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match:
        block, starts = int(match[1]), [sum(config.stages[:i]) for i in range(len(config.stages))]
        stage = max(i for i, start in enumerate(starts) if start <= block)
        layer = block - starts[stage]
        return f"{prefix}encoder.stages.{stage}.layers.{layer}.{_rename_block_part(match[2], _OFFICIAL_TO_HF_BLOCK)}"
    match = re.fullmatch(r"decoder_blocks\.(\d+)\.(.+)", key)
    if match:
        return f"decoder.decoder_block.layers.{match[1]}.{_rename_block_part(match[2], _OFFICIAL_TO_HF_BLOCK)}"
    for pattern, replacement in _OFFICIAL_TO_HF:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement.replace("{p}", prefix), key)
    raise ValueError(f"no transformers key for parameter {key!r}")


def to_official_keys(
    state_dict: Mapping[str, Any], source: str, config: HieraConfig
) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
    """Rename to official keys: ({official key: (source key, array)}, source keys with no rule)."""
    renamed, unused = {}, []
    for key, value in state_dict.items():
        if source == "official":
            new = key
        elif source == "timm":
            new = re.sub(r"^head\.fc\.", "head.projection.", key)
            new = re.sub(r"^head\.norm\.", "norm.", new)
            new = "pos_embed" if new == "pos_embed_abs" else new  # older timm abswin name
        else:
            new = hf_to_official_key(key, config)
        if new is None:
            unused.append(key)
        else:
            renamed[new] = (key, to_numpy(value))
    return renamed, unused


# ---------------------------------------------------------------------- official <-> flax
def official_to_flax(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """`blocks.3.attn.qkv.weight` -> (`blocks_3`, `attn`, `qkv`, `kernel`), with layouts fixed."""
    parts = key.split(".")
    path: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] in _INDEXED_MODULES and i + 1 < len(parts) and parts[i + 1].isdigit():
            path.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        elif parts[i] == "head" and i + 1 < len(parts) and parts[i + 1] == "projection":
            path.append("head")
            i += 2
        else:
            path.append(parts[i])
            i += 1
    if path[-1] in _ABSWIN_TABLES and value.ndim == 4:  # timm abswin tables: NCHW -> NHWC
        value = value.transpose(0, 2, 3, 1)
    if path[-1] == "weight":
        if value.ndim == 1:  # LayerNorm
            path[-1] = "scale"
        elif value.ndim == 2:  # Linear [out, in] -> Dense [in, out]
            path[-1], value = "kernel", value.T
        else:  # Conv [O, I, *k] -> [*k, I, O]
            path[-1] = "kernel"
            value = value.transpose(*range(2, value.ndim), 1, 0)
    return tuple(path), value


def flax_to_official(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of `official_to_flax`."""
    parts: list[str] = []
    for part in path:
        match = re.fullmatch(r"(.+)_(\d+)", part)
        if match and match[1] in _INDEXED_MODULES:
            parts += [match[1], match[2]]
        elif part == "head":
            parts += ["head", "projection"]
        else:
            parts.append(part)
    if parts[-1] in _ABSWIN_TABLES and value.ndim == 4:  # NHWC -> timm's NCHW
        value = value.transpose(0, 3, 1, 2)
    if parts[-1] == "scale":
        parts[-1] = "weight"
    elif parts[-1] == "kernel":
        parts[-1] = "weight"
        if value.ndim == 2:
            value = value.T
        else:
            value = value.transpose(value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))
    return ".".join(parts), value


def _format_keys(keys, limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_state_dict(
    state_dict: Mapping[str, Any],
    name_or_config: str | HieraConfig,
    source: str = "official",
    *,
    model_type: str | None = None,
) -> dict:
    """Flax params for the model named `name_or_config` from a PyTorch state dict.

    `state_dict` maps names to torch tensors or NumPy arrays (an official `{"model_state": ...}`
    wrapper is accepted). `source` is "official", "timm", "hf" or "auto". `model_type` defaults
    to "pretraining" for `mae_*` names and "classification" otherwise; "backbone" targets
    `HieraModel`.
    """
    config = resolve_config(name_or_config)
    model_type = model_type_for(name_or_config, model_type)
    state_dict = unwrap_state_dict(state_dict)
    if source == "auto":
        source = detect_source(state_dict.keys())
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES} or 'auto', got {source!r}")
    if source == "hf" and config.is_video:
        raise ValueError("Hugging Face transformers has no video Hiera; use an official checkpoint")

    renamed, unused = to_official_keys(state_dict, source, config)
    target = flax.traverse_util.flatten_dict(abstract_params(config, model_type))
    filled: dict[tuple[str, ...], np.ndarray] = {}
    mismatched = []
    for official_key, (source_key, value) in renamed.items():
        path, value = official_to_flax(official_key, value)
        if path not in target:
            unused.append(source_key)
        elif tuple(value.shape) != tuple(target[path].shape):
            mismatched.append(
                f"{source_key} -> {'/'.join(path)}: checkpoint {tuple(value.shape)} "
                f"(after layout change) vs model {tuple(target[path].shape)}"
            )
        else:
            filled[path] = value.astype(target[path].dtype)
    missing = ["/".join(p) for p in target if p not in filled]
    problems = []
    if mismatched:
        problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
    if unused:
        problems.append(
            f"{len(unused)} checkpoint tensor(s) that the model has no place for: {_format_keys(unused)}"
        )
    if missing:
        problems.append(
            f"{len(missing)} model parameter(s) the checkpoint does not fill: {_format_keys(missing)}"
        )
    if problems:
        raise ValueError(
            f"checkpoint ({source} format) does not fit {model_type} model "
            f"{name_or_config if isinstance(name_or_config, str) else 'from config'}:\n"
            + "\n".join(problems)
        )
    return flax.traverse_util.unflatten_dict(filled)


def check_params_fit(params: Mapping[str, Any], target: Mapping[str, Any], what: str) -> dict:
    """The flat params (`{path tuple: array}`) if their tree and shapes are `target`'s; else a
    ValueError naming every unexpected, missing and wrongly shaped leaf."""
    flat = flax.traverse_util.flatten_dict(dict(params))
    target = flax.traverse_util.flatten_dict(dict(target))
    extra = ["/".join(p) for p in flat if p not in target]
    missing = ["/".join(p) for p in target if p not in flat]
    wrong = [
        f"{'/'.join(p)}: {tuple(np.shape(v))} vs {tuple(target[p].shape)}"
        for p, v in flat.items()
        if p in target and tuple(np.shape(v)) != tuple(target[p].shape)
    ]
    if extra or missing or wrong:
        raise ValueError(
            f"params do not fit {what}: unexpected {_format_keys(extra)}; "
            f"missing {_format_keys(missing)}; wrong shapes {wrong}"
        )
    return flat


def export_state_dict(
    params: Mapping[str, Any],
    name_or_config: str | HieraConfig,
    *,
    model_type: str | None = None,
    format: str = "official",
) -> dict[str, np.ndarray]:
    """A PyTorch state dict (NumPy arrays) for Flax params, checked against the model.

    `format="official"`: the official keys, for `model.load_state_dict({k: torch.from_numpy(v)
    for k, v in sd.items()})` on the official (or timm) model. `format="hf"`: transformers' keys
    for the class of `model_type`; the config must be one transformers can express
    (`HieraConfig.is_transformers_compatible()`).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    config = resolve_config(name_or_config)
    model_type = model_type_for(name_or_config, model_type)
    if format == "hf" and (why := config.is_transformers_compatible()) is not None:
        raise ValueError(f"this model has no transformers form: {why}")
    params = params.get("params", params) if isinstance(params, Mapping) else params
    flat = check_params_fit(params, abstract_params(config, model_type), f"the {model_type} model")
    out = {}
    for path, value in flat.items():
        key, array = flax_to_official(path, np.asarray(jax.device_get(value), dtype=np.float32))
        if format == "hf":
            key = official_to_hf_key(key, config, model_type)
        out[key] = np.array(array, order="C")  # a writable copy, so torch.from_numpy takes it
    return out
