"""Loading SAM 2's Hiera (HieraDet) by name or path, as `hiera_jax.load_pretrained` loads Hiera.

`load_hieradet(name_or_path)` returns `(module, params)`: `hieradet_neck.ImageEncoder` (trunk +
FPN neck) when the checkpoint has SAM 2's neck, `hieradet.HieraDet` (the trunk) otherwise; the
module carries its configs (`module.trunk` / `module.neck`, or `module.config`). It reads

- a pretrained name (`HIERADET_PRETRAINED`, `list_hieradet_pretrained()`): timm's
  `sam2_hiera_tiny.fb_r896`, `.fb_r896_2pt1`, ... `sam2_hiera_large.fb_r1024(_2pt1)` (the trunk,
  hub repos `timm/<name>`), and the Hugging Face repos `facebook/sam2.1-hiera-{tiny,small,
  base-plus,large}` and `facebook/sam2-hiera-*` (the whole SAM 2 model: transformers'
  `config.json` + `model.safetensors` where the repo has them, else SAM 2's own
  `sam2[.1]_hiera_<size>.pt`). Any other `timm/...` or `facebook/...` repo id, or
  `hf-hub:owner/name`, is read the same way. Downloads go through `hiera_jax.weights.hub`
  (`HF_HOME`, `HF_HUB_OFFLINE=1`, `revision=`, `token=`); a missing file offline is a
  `hub.PretrainedNotFoundError` (a FileNotFoundError) naming it;
- a local file: a timm state dict (`.safetensors`, `.pth`, `.bin`) or a SAM 2 checkpoint
  (`sam2.1_hiera_*.pt`, `{"model": ...}`, read without torch by `formats.read_state_dict`);
- a local directory: transformers' Sam2 (`config.json` + `model.safetensors`; its config decides
  the architecture, `hieradet_hf_config.configs_from_transformers`) or timm's (`config.json` with
  `"architecture"` + weights).

Without a transformers config the variant is read from the tensors (`hieradet_convert.
infer_config`); a name from the table or timm's `"architecture"` must agree with it. Nothing is
cached besides the hub's own download: the conversion is a rename and transposes, done at
every load. Hiera checkpoints are refused with a pointer to `hiera_jax.load_pretrained` (which
refuses HieraDet ones the other way round).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

from hiera_jax.models.hieradet import (
    VARIANTS,
    HieraDet,
    HieraDetConfig,
    HieraDetForImageClassification,
)
from hiera_jax.models.hieradet_neck import FpnNeckConfig, ImageEncoder
from hiera_jax.weights import formats, hub
from hiera_jax.weights import hieradet_convert as convert
from hiera_jax.weights import hieradet_hf_config as transformers_configs
from hiera_jax.weights.convert import unwrap_state_dict
from hiera_jax.weights.directory import read_json

CONFIG_FILE = "config.json"
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SIZES = {  # variant -> (timm tag resolution, Hugging Face id part, SAM 2 file part)
    "sam2_hiera_tiny": ("r896", "tiny", "tiny"),
    "sam2_hiera_small": ("r896", "small", "small"),
    "sam2_hiera_base_plus": ("r896", "base-plus", "base_plus"),
    "sam2_hiera_large": ("r1024", "large", "large"),
}


@dataclasses.dataclass(frozen=True)
class HieraDetPretrained:
    """Where one pretrained HieraDet lives: a hub repo and the weight files to look for in it."""

    model: str  # the variant (hieradet.VARIANTS) its tensors must be
    repo: str  # Hugging Face repo id
    weight_files: tuple[tuple[str, ...], ...]  # groups, tried in order (hub._hf_snapshot)


def _build_table() -> dict[str, HieraDetPretrained]:
    table = {}
    for variant, (resolution, dashed, file_part) in _SIZES.items():
        for suffix, release in (("", "sam2"), ("_2pt1", "sam2.1")):
            name = f"{variant}.fb_{resolution}{suffix}"  # timm's name with its tag
            table[name] = HieraDetPretrained(variant, f"timm/{name}", (TIMM_WEIGHT_FILES,))
            repo = f"facebook/{release}-hiera-{dashed}"
            sam2_file = f"{release}_hiera_{file_part}.pt"
            table[repo] = HieraDetPretrained(variant, repo, (("model.safetensors",), (sam2_file,)))
    return table


HIERADET_PRETRAINED: dict[str, HieraDetPretrained] = _build_table()


def list_hieradet_pretrained() -> list[str]:
    """The names `load_hieradet` takes besides paths and other repo ids."""
    return sorted(HIERADET_PRETRAINED)


def load_hieradet(
    name_or_path: str | os.PathLike,
    *,
    encoder: bool | None = None,
    input_size: int | tuple[int, int] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    classifier: bool | None = False,
    **overrides: Any,
) -> tuple[HieraDet | ImageEncoder | HieraDetForImageClassification, dict]:
    """`(module, params)` for a HieraDet checkpoint: a name, a hub repo, a file or a directory.

    `encoder` None gives the whole `ImageEncoder` when the checkpoint has SAM 2's FPN neck (SAM 2
    checkpoints, transformers' Sam2 models) and the `HieraDet` trunk otherwise (timm's); True
    asks for the encoder (a ValueError for a trunk-only checkpoint), False for the trunk alone.
    `input_size` (an int or (H, W)) sets the trunk config's size; `overrides` change other
    `HieraDetConfig` fields that leave the parameters as they are (`dtype`, `attention_kernel`,
    `drop_path_rate`). Params are float32 NumPy arrays, `{"trunk", "neck"}` for the encoder.
    `classifier=True` gives `HieraDetForImageClassification` with timm's head (`head.norm`,
    `head.fc`), from a timm classifier or a directory `save_hieradet` wrote (train.py's
    `workdir/model` of a HieraDet finetune); `classifier=None` gives it where the checkpoint has
    that head, and otherwise what `classifier=False` gives.
    """
    if classifier not in (None, True, False):
        raise ValueError(f"classifier must be None, True or False, got {classifier!r}")
    if encoder not in (None, True, False):
        raise ValueError(f"encoder must be None, True or False, got {encoder!r}")
    state_dict, hf_config, where, entry = _read(name_or_path, revision, token)
    trunk, neck = _configs(state_dict, hf_config, where, entry)
    trunk = _override(trunk, input_size, overrides)
    if classifier is None:
        classifier = "head.fc.weight" in state_dict and not encoder
    if classifier:
        if "head.fc.weight" not in state_dict:
            raise ValueError(
                f"{where} has no classifier head (head.fc.weight): load its trunk with "
                "classifier=False"
            )
        trunk = trunk.replace(num_classes=int(state_dict["head.fc.weight"].shape[0]))
        params = convert.convert_state_dict(state_dict, trunk, classifier=True)
        return HieraDetForImageClassification(trunk), params
    if encoder and neck is None:
        raise ValueError(
            f"{where} holds SAM 2's trunk only (no image-encoder neck): load it with "
            "encoder=False (or None), or give a SAM 2 / transformers Sam2 checkpoint"
        )
    if encoder is False or neck is None:
        return HieraDet(trunk), convert.convert_state_dict(state_dict, trunk)
    params = convert.convert_image_encoder_state_dict(state_dict, trunk, neck)
    return ImageEncoder(trunk, neck), params


def is_hieradet_source(name_or_path: str | os.PathLike) -> bool:
    """Whether `load_hieradet` is the loader for this name or path, as far as it tells without
    reading tensors: a name of the table, a `facebook/sam2*` or `timm/sam2_hiera*` repo, or a
    directory whose config.json is a transformers Sam2 or a timm HieraDet config."""
    text = os.fspath(name_or_path)
    if text in HIERADET_PRETRAINED:
        return True
    repo = None if os.path.exists(text) else _repo_id(text)
    if repo is not None:
        return repo.split("/")[1].lower().startswith(("sam2", "sam2_hiera"))
    path = os.path.join(text, CONFIG_FILE)
    if os.path.isdir(text) and os.path.isfile(path):
        try:
            meta = read_json(path)
        except ValueError:
            return False
        if not isinstance(meta, Mapping):
            return False
        return meta.get("architecture") in VARIANTS or str(meta.get("model_type", "")).startswith(
            "sam2"
        )
    return False


# ---------------------------------------------------------------------- reading
def _read(
    name_or_path: str | os.PathLike, revision: str | None, token: Any
) -> tuple[dict[str, Any], dict | None, str, HieraDetPretrained | None]:
    """(state dict, config.json or None, a description for messages, the table entry)."""
    text = os.fspath(name_or_path)
    entry = repo = None
    if os.path.exists(text):
        folder = text
    else:
        entry = HIERADET_PRETRAINED.get(text)
        repo = entry.repo if entry else _repo_id(text)
        if repo is None:
            raise _unknown(text)
        groups = entry.weight_files if entry else (("model.safetensors",), ("*.pt",))
        folder = hub._hf_snapshot(repo, revision, token, groups)
        text = f"{repo} ({folder})"
    if os.path.isdir(folder):
        state_dict, hf_config = _read_directory(folder, entry, repo)
    else:
        state_dict, hf_config = formats.read_state_dict(folder)
    state_dict = dict(unwrap_state_dict(state_dict))
    if not formats.is_hieradet_keys(state_dict):
        if formats.is_hiera_keys(state_dict):
            raise formats.OtherFamily(
                f"{text} is a Hiera checkpoint, not SAM 2's HieraDet: load it with "
                "hiera_jax.load_pretrained",
                family="hiera",
            )
        raise ValueError(
            f"{text} holds no SAM 2 HieraDet trunk (no pos_embed_window table); first keys: "
            f"{sorted(state_dict)[:8]}"
        )
    return state_dict, hf_config, text, entry


def _repo_id(text: str) -> str | None:
    if text.startswith("hf-hub:"):
        return text.removeprefix("hf-hub:")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and text.split("/")[0] in hub.HUB_ORGS:
        return text
    return None


def _unknown(text: str) -> Exception:
    if os.sep in text or text.startswith((".", "~")) or (os.altsep and os.altsep in text):
        return FileNotFoundError(f"checkpoint not found: {text}")
    close = difflib.get_close_matches(text, list(HIERADET_PRETRAINED), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ValueError(
        f"{text!r} is not a local path nor a pretrained HieraDet name{hint}: give a SAM 2 "
        "checkpoint (.pt), a timm state dict, a transformers Sam2 directory, a Hugging Face "
        f"repo (timm/..., facebook/..., hf-hub:owner/name), or one of "
        f"{', '.join(list_hieradet_pretrained())}"
    )


def _read_directory(
    folder: str, entry: HieraDetPretrained | None, repo: str | None
) -> tuple[dict[str, Any], dict | None]:
    """A directory's weights: transformers' / timm's files, else the one SAM 2 `.pt` in it."""
    names = [f for group in entry.weight_files for f in group] if entry else []
    names += [*TIMM_WEIGHT_FILES, *sorted(f for f in os.listdir(folder) if f.endswith(".pt"))]
    weights = [os.path.join(folder, f) for f in dict.fromkeys(names)]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        needed = " or ".join(dict.fromkeys(names)) or "model.safetensors or a SAM 2 .pt file"
        if repo is not None:  # a hub snapshot without them
            raise hub.PretrainedNotFoundError(hub._hf_missing_message(repo, None, needed))
        raise FileNotFoundError(f"{folder} has no HieraDet weights: expected {needed}")
    state_dict, _ = formats.read_state_dict(weights[0])
    config_path = os.path.join(folder, CONFIG_FILE)
    hf_config = None
    if weights[0].endswith(TIMM_WEIGHT_FILES) and os.path.isfile(config_path):
        hf_config = read_json(config_path)
    return state_dict, hf_config


# ---------------------------------------------------------------------- configs
def _configs(
    state_dict: Mapping[str, Any],
    hf_config: Mapping[str, Any] | None,
    where: str,
    entry: HieraDetPretrained | None,
) -> tuple[HieraDetConfig, FpnNeckConfig | None]:
    """(trunk config, neck config or None for a trunk-only checkpoint)."""
    keys = list(state_dict)
    has_neck = any(
        k.startswith(("image_encoder.neck.", "neck.", "vision_encoder.neck.")) for k in keys
    )
    hf_config = dict(hf_config) if isinstance(hf_config, Mapping) else None
    if hf_config is not None and "model_type" in hf_config:  # transformers' Sam2 config
        if hf_config["model_type"] == "sam2_hiera_det_model":
            trunk, neck = transformers_configs.trunk_config_from_transformers(hf_config), None
        else:
            trunk, neck = transformers_configs.configs_from_transformers(hf_config)
        return trunk, neck if has_neck else None
    trunk_sd = convert.timm_trunk_items(state_dict)[0]
    architecture = (hf_config or {}).get("architecture")
    model_args = (hf_config or {}).get("model_args")
    if architecture in VARIANTS and isinstance(model_args, Mapping):  # save_hieradet's (timm's)
        fields = {f.name for f in dataclasses.fields(HieraDetConfig)}
        args = {**model_args, **(hf_config.get("hiera_jax_args") or {})}
        trunk = VARIANTS[architecture].replace(**{k: v for k, v in args.items() if k in fields})
        convert.check_state_dict(trunk_sd, trunk)  # the tensors must be this model's
        return _with_input_size(trunk, hf_config), None
    trunk = convert.infer_config(trunk_sd)
    named = entry.model if entry else None
    for what, name in (("is published as", named), ("config.json names", architecture)):
        if name is not None and (name not in VARIANTS or trunk != VARIANTS[name]):
            found = next((n for n, c in VARIANTS.items() if c == trunk), "no registered variant")
            raise ValueError(f"{where} {what} {name}, but its tensors are {found}")
    return _with_input_size(trunk, hf_config), FpnNeckConfig() if has_neck else None


def _with_input_size(trunk: HieraDetConfig, hf_config: Mapping[str, Any] | None) -> HieraDetConfig:
    """timm's `pretrained_cfg.input_size` (C, H, W), where config.json has it."""
    size = (hf_config or {}).get("pretrained_cfg", {}).get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        trunk = trunk.replace(input_size=tuple(size[1:]))
    return trunk


# ---------------------------------------------------------------------- saving
TIMM_MODEL_ARGS = (
    "embed_dim", "num_heads", "stages", "q_pool", "q_stride", "dim_mul", "head_mul",
    "window_spec", "global_att_blocks", "global_pos_size", "drop_path_rate", "init_values",
    "in_chans", "patch_kernel", "patch_stride", "patch_padding", "head_init_scale",
)  # fmt: skip
# HieraDetConfig fields timm's HieraDet has no keyword for (it fixes them at these values).
EXTRA_ARGS = {"mlp_ratio": 4.0, "layer_norm_eps": 1e-6}


def save_hieradet(
    directory: str | os.PathLike,
    params: Mapping[str, Any],
    config: HieraDetConfig,
    *,
    architecture: str,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    crop_pct: float = 0.875,
) -> str:
    """Write a HieraDet (the trunk, or a classifier: params with `head`) as timm's hub directory.

    `model.safetensors` holds timm's keys; `config.json` timm's fields: `architecture` (the
    variant it was built from), `model_args` (every timm `HieraDet` keyword, so a size that is
    not registered comes back exact), `num_classes`, `pretrained_cfg` (input size, mean, std,
    crop_pct)
    and `hiera_jax_args` (`mlp_ratio`, `layer_norm_eps`: timm fixes them at 4 and 1e-6). `load_hieradet(directory, classifier=...)` reads it, and timm builds it with
    `create_model(architecture, num_classes=..., **model_args)` + `load_state_dict(strict=True)`.
    Returns the directory.
    """
    import json

    from safetensors.numpy import save_file

    if architecture not in VARIANTS:
        raise ValueError(f"architecture must be one of {', '.join(VARIANTS)}, got {architecture!r}")
    state_dict = convert.export_state_dict(params, config, format="timm")
    num_classes = config.num_classes if "head.fc.weight" in state_dict else 0
    meta = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": config.stage_dims[-1],
        "model_args": json.loads(json.dumps({k: getattr(config, k) for k in TIMM_MODEL_ARGS})),
        "hiera_jax_args": {k: getattr(config, k) for k in EXTRA_ARGS},  # timm: these defaults
        "pretrained_cfg": {
            "input_size": [config.in_chans, *config.input_size],
            "mean": list(mean),
            "std": list(std),
            "crop_pct": float(crop_pct),  # eval: short side to size / crop_pct, centre crop
            "num_classes": num_classes,
        },
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(state_dict, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return directory


def _override(
    trunk: HieraDetConfig, input_size: Any, overrides: Mapping[str, Any]
) -> HieraDetConfig:
    allowed = {"dtype", "attention_kernel", "mlp_kernel", "drop_path_rate"}
    if unknown := set(overrides) - allowed:
        raise ValueError(
            f"load_hieradet cannot override {sorted(unknown)}: the checkpoint decides the "
            f"architecture; only input_size and {sorted(allowed)} can change"
        )
    changes = dict(overrides)
    if input_size is not None:
        changes["input_size"] = input_size
    return trunk.replace(**changes) if changes else trunk
