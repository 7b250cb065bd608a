"""Pretrained model directories: `config.json` + orbax params, written and read with checks.

A directory made by `save_pretrained` (or `convert/convert_pytorch.py`) holds

    config.json   {"format": "hiera-jax", "model_type": ..., "name": ..., "config": {...}}
    params/       an orbax StandardCheckpointer tree of float32 arrays
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from hiera_jax.models import pos_embed
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.factory import MODEL_TYPES, abstract_params, build_model
from hiera_jax.weights import adapt

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT = "hiera-jax"


def save_pretrained(
    directory: str,
    params: Any,
    config: HieraConfig,
    *,
    model_type: str,
    name: str | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> str:
    """Write `params` and `config` to `directory` (created; an existing params dir is replaced)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:  # every process saves its params collectively; one writes JSON
        meta = {
            "format": FORMAT,
            "model_type": model_type,
            "name": name,
            "config": config.to_dict(),
        }
        if preprocessing is not None:  # e.g. {"mean": [...], "std": [...]} of the training data
            meta["preprocessing"] = {k: list(v) for k, v in preprocessing.items()}
        tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, os.path.join(directory, CONFIG_FILE))
    return directory


def _missing_config_message(directory: str, path: str) -> str:
    """Why `directory` has no config.json, with the fix (a train.py workdir holds it in model/)."""
    if not os.path.exists(directory):
        return f"{directory} does not exist, so it is not a hiera-jax model directory"
    if not os.path.isdir(directory):
        return f"{directory} is a file, not a hiera-jax model directory (config.json + params/)"
    model_dir = os.path.join(directory, "model")
    if os.path.isfile(os.path.join(model_dir, CONFIG_FILE)):
        return (
            f"{path} not found: {directory} is a training workdir; the model is in {model_dir} "
            "(load that directory)"
        )
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        return (
            f"{path} not found: {directory} is a training workdir with checkpoints but no "
            f"exported model in {model_dir} (the run has not finished, or ran with "
            f"export_model=False); rerun `python train.py --config CONFIG --workdir {directory}` "
            f"to resume it: it writes {model_dir} when it ends"
        )
    return (
        f"{path} not found: {directory} is not a hiera-jax model directory "
        "(make one with convert/convert_pytorch.py or hiera_jax.save_pretrained)"
    )


def _read_meta(directory: str) -> tuple[HieraConfig, str, dict[str, Any]]:
    """Parse and check `config.json` once: (config, model_type, the whole JSON)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_config_message(directory, path))
    try:
        with open(path) as f:
            meta = json.load(f)
        config = HieraConfig.from_dict(meta["config"])
        model_type = meta["model_type"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid hiera-jax config: {err!r}") from err
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: unknown model_type {model_type!r}")
    return config, model_type, meta


def read_config(directory: str) -> tuple[HieraConfig, str, str | None]:
    """(config, model_type, name) from a pretrained directory, with clear errors."""
    config, model_type, meta = _read_meta(directory)
    return config, model_type, meta.get("name")


def read_preprocessing(directory: str) -> dict[str, Any] | None:
    """The input normalisation a directory was saved with (train.py stores its data mean/std)."""
    return _read_meta(directory)[2].get("preprocessing")


def load_directory(directory: str | os.PathLike, *, in_chans: int | None = None, **overrides: Any):
    """`(model, params)` from a model directory (`save_pretrained`, the converter, train.py).

    `overrides` replace config fields that do not change parameter shapes (e.g. `dtype`,
    `remat`, `drop_path_rate`, `mask_ratio`). `input_size` may also differ from the checkpoint's:
    the position embeddings are then resampled to the new token grid (bicubic in space, linear
    in time for video; see `hiera_jax.models.pos_embed`). `in_chans` adapts the patch-embedding
    kernel to another channel count as timm does (`hiera_jax.weights.adapt`), so RGB weights serve
    1- or 4-channel inputs (classification and backbone models).
    """
    directory = os.path.abspath(os.fspath(directory))
    config, model_type, _ = read_config(directory)
    if in_chans is not None and in_chans != config.in_chans and model_type == "pretraining":
        adapt.adapt_in_chans({}, config, in_chans, model_type)  # raises with the reason
    input_size = overrides.pop("input_size", None)
    if overrides:
        config = config.replace(**overrides)
    target_config = config
    if input_size is not None:
        if isinstance(input_size, int):  # a square side; video keeps its frame count
            input_size = (*config.input_size[:-2], input_size, input_size)
        input_size = tuple(input_size)
        try:
            target_config = config.replace(input_size=input_size)
        except ValueError as err:
            raise ValueError(
                f"cannot run the checkpoint in {directory} (trained at {config.input_size}) at "
                f"input_size={input_size}: {err}"
            ) from err
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} not found: the checkpoint has no parameters")
    expected = abstract_params(config, model_type)
    device = jax.local_devices()[0]
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(params_dir)
            stored = getattr(stored, "item_metadata", stored)
            stored_flat = {
                p: tuple(m.shape) for p, m in flax.traverse_util.flatten_dict(dict(stored)).items()
            }
        except Exception as err:  # orbax raises many types for unreadable directories
            raise ValueError(f"cannot read checkpoint {params_dir}: {err}") from err
        expected_flat = flax.traverse_util.flatten_dict(expected)
        missing = sorted("/".join(p) for p in expected_flat if p not in stored_flat)
        extra = sorted("/".join(p) for p in stored_flat if p not in expected_flat)
        wrong = sorted(
            f"{'/'.join(p)}: stored {stored_flat[p]} vs model {tuple(v.shape)}"
            for p, v in expected_flat.items()
            if p in stored_flat and stored_flat[p] != tuple(v.shape)
        )
        if missing or extra or wrong:
            raise ValueError(
                f"checkpoint {params_dir} does not fit the {model_type} model of its config: "
                f"missing {missing[:20]}, unexpected {extra[:20]}, wrong shapes {wrong[:20]}"
            )
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
            ),
            expected,
        )
        try:
            params = checkpointer.restore(params_dir, target)
        except Exception as err:
            raise ValueError(f"cannot restore checkpoint {params_dir}: {err}") from err
    if target_config != config:
        params = pos_embed.resize_pos_embed_params(params, config, target_config)
        params = jax.tree.map(lambda a: jax.device_put(a, device), params)
    if in_chans is not None and in_chans != target_config.in_chans:
        params, target_config = adapt.adapt_in_chans(params, target_config, in_chans, model_type)
        params = jax.tree.map(lambda a: jax.device_put(a, device), params)
    return build_model(target_config, model_type), params
