"""Model directories: what `save_pretrained` writes and every loader reads, with checks.

A directory written by `save_pretrained` (the converter, train.py, `model.save_pretrained`) is a
transformers model directory:

    config.json               transformers' HieraConfig (`model_type: "hiera"`), our own fields
                              under `hiera_jax`, and `architectures`: the class it holds
    model.safetensors         float32 tensors with transformers' keys and PyTorch layouts, so
                              `transformers.HieraForPreTraining.from_pretrained(dir)` (or the
                              class of `architectures`) loads it
    preprocessor_config.json  with `preprocessing=` (train.py: its data's mean/std): the image
                              processor (transformers' BitImageProcessor, HieraImageProcessor)

A model transformers cannot express (video, timm's abswin, a block rule transformers computes
differently: `HieraConfig.is_transformers_compatible()`) is written the same way but with the
official PyTorch keys in `model_official.safetensors` (the official model's `load_state_dict`
takes them, timm's through its `checkpoint_filter_fn`), so transformers stops at the missing
`model.safetensors` instead of building another model.

Directories of the earlier format (`{"format": "hiera-jax", "config": ...}` + orbax `params/`)
and transformers' own (`model.safetensors` or `pytorch_model.bin`) load too. In every case the
directory's config.json decides the architecture, and tensors that do not fit it are an error
that names them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax
import jax
import numpy as np

from hiera_jax.models import pos_embed
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.factory import MODEL_TYPES, abstract_params, build_model
from hiera_jax.weights import adapt, formats
from hiera_jax.weights import convert as convert_lib

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
HF_WEIGHTS = "model.safetensors"  # transformers' keys
OFFICIAL_WEIGHTS = "model_official.safetensors"  # the official keys (no transformers form)
WEIGHT_FILES = (HF_WEIGHTS, OFFICIAL_WEIGHTS, "pytorch_model.bin")
LEGACY_PARAMS_DIR = "params"  # orbax, the format before transformers' directories
LEGACY_FORMAT = "hiera-jax"
# transformers' class for each model type (`architectures` in config.json).
ARCHITECTURES = {
    "classification": "HieraForImageClassification",
    "pretraining": "HieraForPreTraining",
    "backbone": "HieraModel",
    "feature_backbone": "HieraBackbone",
}
MODEL_TYPE_OF = {cls: model_type for model_type, cls in ARCHITECTURES.items()}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a directory holds: the architecture, the class, NumPy params, the preprocessing."""

    config: HieraConfig
    model_type: str
    params: dict
    preprocessing: dict[str, Any] | None  # {"image_mean": ..., ...} of preprocessor_config.json


# ---------------------------------------------------------------------- writing
def save_pretrained(
    directory: str | os.PathLike,
    params: Any,
    config: HieraConfig,
    *,
    model_type: str,
    preprocessing: dict[str, Any] | None = None,
    name: str | None = None,
) -> str:
    """Write `params` of the `model_type` model of `config` into `directory` (module docstring).

    `params` are host arrays (gather sharded ones first; only process 0 writes). `preprocessing`
    (`{"mean": ..., "std": ...}`, optionally `crop_size`, `resize_size`) writes a
    `preprocessor_config.json` for the model's input size. `name` is accepted for older callers
    and not stored (the config says what the model is). Files of another format left in the
    directory by an earlier save are removed, so what loads is what was saved now.
    """
    del name
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    directory = os.path.abspath(os.fspath(directory))
    params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), dict(params))
    hf_form = config.is_transformers_compatible() is None
    state_dict = convert_lib.export_state_dict(
        params, config, model_type=model_type, format="hf" if hf_form else "official"
    )
    if jax.process_index() != 0:
        return directory
    os.makedirs(directory, exist_ok=True)
    weights = HF_WEIGHTS if hf_form else OFFICIAL_WEIGHTS
    meta = config.to_dict()
    meta["architectures"] = [ARCHITECTURES[model_type]]
    if model_type == "pretraining":  # the decoder's size as built (transformers needs it given)
        meta.update(
            decoder_hidden_size=config.decoder_width,
            decoder_depth=config.decoder_blocks,
            decoder_num_heads=config.decoder_heads,
        )
    from safetensors.numpy import save_file

    _write(directory, weights, lambda path: save_file(state_dict, path, metadata={"format": "pt"}))
    _write(directory, CONFIG_FILE, lambda path: _dump_json(meta, path))
    if preprocessing is not None:
        processor = preprocessor_config(config, **preprocessing)
        _write(directory, PREPROCESSOR_FILE, lambda path: _dump_json(processor, path))
    for stale in [*WEIGHT_FILES, LEGACY_PARAMS_DIR]:
        path = os.path.join(directory, stale)
        if stale != weights and os.path.lexists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return directory


def preprocessor_config(
    config: HieraConfig,
    mean: Any,
    std: Any,
    crop_size: Any = None,
    resize_size: int | None = None,
) -> dict[str, Any]:
    """transformers' `preprocessor_config.json` (BitImageProcessor, as the `-hf` repos use) for
    a model: short side `256 / 224 · crop` (bicubic), centre crop to the input size, [0, 1]
    rescale, then `(x - mean) / std`."""
    height, width = tuple(crop_size or config.input_size[-2:])
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != config.in_chans or len(std) != config.in_chans:
        raise ValueError(
            f"mean/std have {len(mean)}/{len(std)} values but the model takes "
            f"{config.in_chans} channels"
        )
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(resize_size or int(256 / 224 * min(height, width)))},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": int(height), "width": int(width)},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": config.in_chans == 3,
    }


def _write(directory: str, name: str, write) -> None:
    """Write `directory/name` through a temporary file, so a crash never leaves half a file."""
    path = os.path.join(directory, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dump_json(value: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------- reading
def _missing_config_message(directory: str, path: str) -> str:
    """Why `directory` has no config.json, with the fix (a train.py workdir holds it in model/)."""
    if not os.path.exists(directory):
        return f"{directory} does not exist, so it is not a hiera-jax model directory"
    if not os.path.isdir(directory):
        return (
            f"{directory} is a file, not a hiera-jax model directory (config.json + "
            "model.safetensors)"
        )
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
        "(make one with hiera-jax-convert or save_pretrained)"
    )


def read_json(path: str) -> Any:
    """A JSON file, or ValueError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as JSON: {err}") from err


def _weight_file(directory: str) -> str | None:
    found = [os.path.join(directory, f) for f in WEIGHT_FILES]
    return next((f for f in found if os.path.isfile(f)), None)


def is_model_directory(directory: str) -> bool:
    """Whether `directory` is one this module reads as it is (ours, old or transformers')."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    try:
        meta = read_json(path)
    except ValueError:
        return True  # ours by name; read_config explains what is wrong with it
    if not isinstance(meta, dict):
        return False
    if meta.get("format") == LEGACY_FORMAT:
        return True
    return meta.get("model_type") == "hiera" and _weight_file(directory) is not None


def _config_and_meta(directory: str) -> tuple[HieraConfig, dict[str, Any], str]:
    """(config, the JSON, its path) of a directory's config.json, in any of its formats."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_config_message(directory, path))
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a model config (a JSON object)")
    if meta.get("format") == LEGACY_FORMAT:
        try:
            return HieraConfig.from_dict(meta["config"]), meta, path
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a valid hiera-jax config: {err!r}") from err
    if meta.get("model_type") != "hiera":
        raise ValueError(
            f"{path} is not a Hiera config (model_type {meta.get('model_type')!r}, expected "
            "'hiera')"
        )
    try:
        return HieraConfig.from_dict(meta), meta, path
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


def read_hiera_config(directory: str | os.PathLike) -> HieraConfig:
    """The config of a directory's config.json alone (no weights needed)."""
    return _config_and_meta(os.fspath(directory))[0]


def read_config(directory: str | os.PathLike) -> tuple[HieraConfig, str]:
    """(config, model_type) of a model directory, from config.json (and the tensor names when
    config.json has no `architectures`), with clear errors."""
    directory = os.fspath(directory)
    config, meta, path = _config_and_meta(directory)
    if meta.get("format") == LEGACY_FORMAT:
        model_type = meta.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{path}: unknown model_type {model_type!r}")
        return config, model_type
    architectures = meta.get("architectures") or []
    known = [MODEL_TYPE_OF[a] for a in architectures if a in MODEL_TYPE_OF]
    if architectures and not known:
        raise ValueError(
            f"{path}: architectures {architectures} names no Hiera class "
            f"({', '.join(ARCHITECTURES.values())})"
        )
    if known:
        return config, known[0]
    weights = _weight_file(directory)
    if weights is None:
        raise FileNotFoundError(f"{directory} has config.json but no {' or '.join(WEIGHT_FILES)}")
    return config, formats.model_type_of_keys(formats.read_keys(weights))


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """The config, class, NumPy params and preprocessing of a model directory, all checked."""
    directory = os.path.abspath(os.fspath(directory))
    config, model_type = read_config(directory)
    processor_path = os.path.join(directory, PREPROCESSOR_FILE)
    preprocessing = read_json(processor_path) if os.path.isfile(processor_path) else None
    meta = read_json(os.path.join(directory, CONFIG_FILE))
    if meta.get("format") == LEGACY_FORMAT:
        params = _read_legacy_params(directory, config, model_type)
        if preprocessing is None and meta.get("preprocessing"):
            preprocessing = {
                "image_mean": list(meta["preprocessing"]["mean"]),
                "image_std": list(meta["preprocessing"]["std"]),
            }
        return Checkpoint(config, model_type, params, preprocessing)
    weights = _weight_file(directory)
    if weights is None:
        raise FileNotFoundError(f"{directory} has config.json but no {' or '.join(WEIGHT_FILES)}")
    state_dict, _ = formats.read_state_dict(weights)
    try:
        params = convert_lib.convert_state_dict(state_dict, config, "auto", model_type=model_type)
    except ValueError as err:
        raise ValueError(
            f"{weights} does not fit the {ARCHITECTURES[model_type]} that {CONFIG_FILE} "
            f"describes: {err}"
        ) from err
    return Checkpoint(config, model_type, params, preprocessing)


def _read_legacy_params(directory: str, config: HieraConfig, model_type: str) -> dict:
    """The orbax `params/` tree of a directory of the earlier format, checked against config."""
    import orbax.checkpoint as ocp

    params_dir = os.path.join(directory, LEGACY_PARAMS_DIR)
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
    return jax.tree.map(np.asarray, params)


# ---------------------------------------------------------------------- one class from another
def params_for(
    checkpoint: Checkpoint,
    model_type: str,
    config: HieraConfig | None = None,
    *,
    key: jax.Array | None = None,
    ignore_mismatched_sizes: bool = False,
) -> tuple[dict, list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Params of the `model_type` model of `config` (default: the checkpoint's) from a checkpoint,
    as transformers loads one class from another's weights: what both have is copied, what the
    checkpoint lacks (a head, a decoder, a norm) is initialised from `key`, the rest is dropped.

    Returns (params, paths the checkpoint lacks, (path, checkpoint shape, model shape) of the
    tensors whose shape differs), both newly initialised. A tensor of another shape is an error,
    unless `ignore_mismatched_sizes` (then it is initialised anew, e.g. a head for another class
    count), as transformers reports `missing_keys` and `mismatched_keys`.
    """
    config = config or checkpoint.config
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if model_type == checkpoint.model_type and config == checkpoint.config:
        return checkpoint.params, [], []
    source = flax.traverse_util.flatten_dict(checkpoint.params)
    target = flax.traverse_util.flatten_dict(abstract_params(config, model_type))
    fresh = None
    out, missing, resized, mismatched = {}, [], [], []
    for path, leaf in target.items():
        value = source.get(path)
        if value is not None and tuple(value.shape) == tuple(leaf.shape):
            out[path] = np.asarray(value)
            continue
        if value is not None and not ignore_mismatched_sizes:
            mismatched.append(f"{'/'.join(path)}: {tuple(value.shape)} vs {tuple(leaf.shape)}")
            continue
        if fresh is None:
            from hiera_jax.models.factory import init_params

            model = build_model(config, model_type)
            fresh = flax.traverse_util.flatten_dict(
                init_params(model, key if key is not None else jax.random.key(0))
            )
        out[path] = np.asarray(fresh[path])
        if value is None:
            missing.append("/".join(path))
        else:
            resized.append(("/".join(path), tuple(value.shape), tuple(leaf.shape)))
    if mismatched:
        raise ValueError(
            f"the checkpoint's tensors do not fit the {ARCHITECTURES[model_type]} asked for: "
            f"{'; '.join(mismatched[:10])}; pass ignore_mismatched_sizes=True to initialise "
            "them anew"
        )
    return flax.traverse_util.unflatten_dict(out), missing, resized


# ---------------------------------------------------------------------- the module API
def load_directory(directory: str | os.PathLike, *, in_chans: int | None = None, **overrides: Any):
    """`(module, params)` from a model directory (`save_pretrained`, the converter, train.py).

    `overrides` replace config fields that do not change parameter shapes (e.g. `dtype`,
    `remat`, `drop_path_rate`, `mask_ratio`). `input_size` may also differ from the checkpoint's:
    the position embeddings are then resampled to the new token grid (bicubic in space, linear
    in time for video; see `hiera_jax.models.pos_embed`). `in_chans` adapts the patch-embedding
    kernel to another channel count as timm does (`hiera_jax.weights.adapt`), so RGB weights serve
    1- or 4-channel inputs (classification and backbone models).
    """
    checkpoint = read_checkpoint(directory)
    config, params = adapt_checkpoint(checkpoint, in_chans=in_chans, **overrides)
    return build_model(config, checkpoint.model_type), params


def adapt_checkpoint(
    checkpoint: Checkpoint, *, in_chans: int | None = None, **overrides: Any
) -> tuple[HieraConfig, dict]:
    """(config, params) of a checkpoint with `overrides`, another `input_size` (position tables
    resampled) and another `in_chans` (patch embedding adapted) applied; see `load_directory`."""
    config, model_type = checkpoint.config, checkpoint.model_type
    if in_chans is not None and in_chans != config.in_chans and model_type == "pretraining":
        adapt.adapt_in_chans({}, config, in_chans, model_type)  # raises with the reason
    input_size = overrides.pop("input_size", overrides.pop("image_size", None))
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
                f"cannot run the checkpoint (trained at {config.input_size}) at "
                f"input_size={input_size}: {err}"
            ) from err
    device = jax.local_devices()[0]
    params = checkpoint.params
    if target_config != config:
        params = pos_embed.resize_pos_embed_params(params, config, target_config)
    if in_chans is not None and in_chans != target_config.in_chans:
        params, target_config = adapt.adapt_in_chans(params, target_config, in_chans, model_type)
    params = jax.tree.map(lambda a: jax.device_put(np.asarray(a), device), params)
    return target_config, params
