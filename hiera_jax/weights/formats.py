"""Reading PyTorch checkpoint files: official/timm `.pth`, `.safetensors`, Hugging Face directories.

None of them needs torch. Safetensors (most Hugging Face checkpoints) are read with
`safetensors.numpy`; pickled files (`.pth`, `.pt`, `.bin`, `.ckpt`) with `hiera_jax.weights.torch_pickle`,
a restricted unpickler that takes tensors and plain containers and refuses anything else (a pickle
can run code) with a ValueError naming what it refused.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from hiera_jax.models.config import HieraConfig
from hiera_jax.weights import torch_pickle

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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


def check_hf_config(hf_config: dict[str, Any], config: HieraConfig) -> None:
    """ValueError if a Hugging Face config.json describes a different architecture."""
    heads = [int(config.num_heads * config.head_mul**i) for i in range(len(config.stages))]
    expected = {
        "embed_dim": config.embed_dim,
        "depths": list(config.stages),
        "num_heads": heads,
        "image_size": list(config.input_size),
        "patch_size": list(config.patch_kernel),
        "patch_stride": list(config.patch_stride),
        "patch_padding": list(config.patch_padding),
        "query_stride": list(config.q_stride),
        "masked_unit_size": list(config.mask_unit_size),
        "num_channels": config.in_chans,
        "embed_dim_multiplier": config.dim_mul,
        "mlp_ratio": config.mlp_ratio,
    }
    if hf_config.get("decoder_hidden_size") is not None:
        expected.update(
            decoder_hidden_size=config.decoder_embed_dim,
            decoder_depth=config.decoder_depth,
            decoder_num_heads=config.decoder_num_heads,
        )
    wrong = [
        f"{key}: checkpoint {hf_config[key]} vs model {value}"
        for key, value in expected.items()
        if key in hf_config and _normalise(hf_config[key]) != _normalise(value)
    ]
    if wrong:
        raise ValueError(
            "Hugging Face config.json does not describe this model: " + "; ".join(wrong)
        )
    for key, ours in (
        ("num_query_pool", config.q_pool),
        ("masked_unit_attention", list(config.mask_unit_attn)),
    ):
        if key in hf_config and _normalise(hf_config[key]) != _normalise(ours):
            warnings.warn(
                f"Hugging Face config has {key}={hf_config[key]} but the target model uses {ours}; "
                "parameters are the same, outputs will follow the target model",
                stacklevel=2,
            )


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return value
