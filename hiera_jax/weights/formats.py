"""Reading PyTorch checkpoint files: official/timm `.pth`, `.safetensors`, Hugging Face directories.

None of them needs torch. Safetensors (most Hugging Face checkpoints) are read with
`safetensors.numpy`; pickled files (`.pth`, `.pt`, `.bin`, `.ckpt`) with `hiera_jax.weights.torch_pickle`,
a restricted unpickler that takes tensors and plain containers and refuses anything else (a pickle
can run code) with a ValueError naming what it refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hiera_jax.models.config import EXECUTION_FIELDS, HieraConfig
from hiera_jax.models.hf_names import HF_KEPT_ATTRIBUTES
from hiera_jax.weights import torch_pickle

# A directory's weights, in the order they are looked for (see hiera_jax.weights.directory).
HF_WEIGHT_FILES = ("model.safetensors", "model_official.safetensors", "pytorch_model.bin")


def read_state_dict(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict, Hugging Face config.json or None) from a file or a Hugging Face directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    hf_config = None
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        weights = [
            os.path.join(path, f) for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, f))
        ]
        if not os.path.isfile(config_path) or not weights:
            raise FileNotFoundError(
                f"{path} is a directory but not a Hugging Face checkpoint: expected config.json and "
                f"one of {', '.join(HF_WEIGHT_FILES)}"
            )
        try:
            with open(config_path) as f:
                hf_config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from err
        path = weights[0]
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path)), hf_config
        except Exception as err:  # safetensors raises SafetensorError for truncated files
            raise ValueError(
                f"cannot read {path} as safetensors (corrupt or truncated?): {err}"
            ) from err
    return _read_pickle(path), hf_config


def _read_pickle(path: str) -> dict[str, Any]:
    state = torch_pickle.load(path)  # ValueError for refused globals and unreadable files
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def read_keys(path: str) -> list[str]:
    """The tensor names of a weight file (a safetensors header only, without its tensors)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        except Exception as err:  # safetensors raises SafetensorError for truncated files
            raise ValueError(
                f"cannot read {path} as safetensors (corrupt or truncated?): {err}"
            ) from err
    return list(_read_pickle(path))


def model_type_of_keys(keys) -> str:
    """Which model a state dict in any of the formats holds, from its key names.

    An MAE decoder makes it `pretraining`, a classifier `classification`, transformers' backbone
    norms `feature_backbone` (HieraBackbone), none of them `backbone` (HieraModel).
    """
    keys = {k.removeprefix("hiera.") for k in keys}
    if keys & {"decoder_pred.weight", "decoder.decoder_pred.weight"}:
        return "pretraining"
    if keys & {"head.projection.weight", "head.fc.weight", "classifier.weight"}:
        return "classification"
    if any(k.startswith("hidden_states_norms.") for k in keys):
        return "feature_backbone"
    return "backbone"


HIERADET_LOADER = "hiera_jax.weights.hieradet_loading.load_hieradet"


class OtherFamily(ValueError):
    """A family's loader found another family's checkpoint; `family` names that family
    ("hiera", "hieradet"), so `hiera_jax.families.dispatch` hands it over by type, not by
    reading the message."""

    def __init__(self, message: str, family: str | None):
        super().__init__(message)
        self.family = family


_HIERA_PATCH_KEYS = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")


def is_hieradet_keys(keys) -> bool:
    """Whether the key names are SAM 2's Hiera (HieraDet) in any layout: timm's `sam2_hiera_*`,
    a SAM 2 checkpoint, transformers' Sam2 models. Only HieraDet has a tiled window position
    table (`pos_embed_window`)."""
    return any(k == "pos_embed_window" or k.endswith(".pos_embed_window") for k in keys)


def is_hiera_keys(keys) -> bool:
    """Whether the key names are a Hiera (not HieraDet) model's, in any of its layouts."""
    keys = list(keys)
    return not is_hieradet_keys(keys) and any(
        k.removeprefix("hiera.") in _HIERA_PATCH_KEYS for k in keys
    )


def config_differences(found: HieraConfig, expected: HieraConfig) -> list[str]:
    """`key: checkpoint X vs model Y` for every architecture field (transformers' names) where a
    checkpoint's config and the one asked for differ."""
    ours, theirs = found.to_dict(), expected.to_dict()
    skip = {"id2label", "label2id", "out_features", "out_indices", "output_hidden_states",
            "output_attentions", "return_dict", "problem_type", "drop_path_rate", "mask_ratio",
            "stage_names", "hidden_size", *HF_KEPT_ATTRIBUTES}  # fmt: skip
    wrong = [
        f"{key}: checkpoint {ours[key]} vs model {theirs[key]}"
        for key in theirs
        if key not in skip and key != "hiera_jax" and ours.get(key) != theirs[key]
    ]
    for key, value in theirs["hiera_jax"].items():
        if key not in EXECUTION_FIELDS and ours["hiera_jax"].get(key) != value:
            wrong.append(f"{key}: checkpoint {ours['hiera_jax'].get(key)} vs model {value}")
    if found.num_classes != expected.num_classes:
        wrong.append(f"num_labels: checkpoint {found.num_classes} vs model {expected.num_classes}")
    return wrong
