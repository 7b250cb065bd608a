"""The base ml_collections config every file in `configs/` starts from, and model building."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from hiera_jax import families


def base_config() -> ml_collections.ConfigDict:
    """Every key the training loop reads, with defaults; configs override what they need."""
    c = ml_collections.ConfigDict()
    c.task = "mae"  # "mae" (HieraForPreTraining) or "classification" (HieraForImageClassification;
    # HieraDetForImageClassification for a sam2_hiera_* model.name)
    c.seed = 0

    # Model: `name` picks a registry variant (hiera_jax.list_models(), or SAM 2's HieraDet:
    # sam2_hiera_tiny|small|base_plus|large); every other key is a HieraConfig (HieraDetConfig)
    # field overriding it (or, with no name, the whole HieraConfig). Every field is here,
    # unset, so any can be set from the command line (--config.model.dtype=bfloat16); configs
    # fill them with `c.model.update(...)`.
    c.model = model_fields()
    c.model.name = "mae_hiera_tiny_224"
    # Finetuning init: a model directory (save_pretrained / converter output), a training workdir
    # holding `model/`, or a pretrained name or repo id (facebook/hiera-base-224-mae-hf,
    # mae_hiera_base_224, a .pth file or URL); its encoder (patch_embed, pos_embed*, blocks_*) is
    # copied.
    c.init_from = ""

    # Steps: total_steps > 0 wins over num_epochs; the same for warmup.
    c.batch_size = 256  # global, over all processes
    # Gradient accumulation: each step runs batch_size as this many equal microbatches, one after
    # another, and makes one update with their mean gradient (less activation memory, same
    # result). batch_size must be divisible by grad_accum_steps x the number of mesh devices.
    c.grad_accum_steps = 1
    c.num_epochs = 1.0
    c.total_steps = 0
    c.warmup_epochs = 0.0
    c.warmup_steps = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 8e-4  # peak lr at `lr_scaling_batch`
    c.optim.lr_scaling_batch = 0  # scale lr linearly with batch_size / this (0: lr as given)
    c.optim.min_lr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = 1.0  # BEiT layer-wise lr decay (finetuning); 1.0 = off
    c.optim.clip_grad_norm = 0.0  # 0 = no clipping
    c.label_smoothing = 0.0

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # digits | moving_digits | tfds | folder
    # grain (random access, no TensorFlow: digits, ArrayRecord TFDS, class folders) or tf
    # (tf.data, pip install -e '.[tf]': TFRecord TFDS, tfds ImageFolder); auto: grain unless a
    # TFDS dataset is prepared only as TFRecord.
    c.data.backend = "auto"
    c.data.name = ""  # tfds dataset name (e.g. imagenet2012)
    c.data.data_dir = ""  # tfds data_dir, or the root of a class-subfolder image tree
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_key = "image"
    c.data.label_key = "label"
    c.data.num_frames = 0  # video: frames per clip (0 = images)
    c.data.frame_stride = 4  # video: take every n-th frame of the source clip
    c.data.crop_scale = (0.2, 1.0)  # RandomResizedCrop area range
    c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.data.flip = True
    c.data.randaug = ""  # timm-style, e.g. "rand-m9-mstd0.5-inc1"; "" = off
    c.data.reprob = 0.0  # random erasing probability (pixel mode)
    c.data.repeated_aug = 1  # each example R times in a row, differently augmented (MAE-ST video)
    c.data.mixup = 0.0  # mixup alpha (0 = off)
    c.data.cutmix = 0.0  # cutmix alpha (0 = off)
    c.data.mixup_prob = 1.0
    c.data.mixup_switch_prob = 0.5
    c.data.crop_pct = 0.875  # eval: resize to size / crop_pct, center crop
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)
    c.data.workers = 4  # threads decoding and augmenting examples ahead of the step
    c.data.worker_processes = 0  # grain: >0 prepares whole batches in this many processes
    c.data.prefetch = 2  # batches prepared ahead
    c.data.shuffle_buffer = 10_000  # tf backend: encoded examples in the tf.data shuffle buffer

    # Device mesh ("data", "fsdp"); one -1 takes the remaining devices.
    c.mesh_shape = (-1, 1)
    c.shard_min_size = 2**14  # leaves smaller than this many elements stay replicated

    # Evaluation, logging, checkpoints.
    c.eval_every = 0  # steps; 0 = only at the end, -1 = never
    c.eval_batch_size = 0  # 0 = batch_size
    c.eval_max_examples = 0  # 0 = the whole eval split
    c.num_vis = 8  # MAE: examples in the reconstruction grid
    c.log_every = 10
    # MFU: model FLOP/s per device over this peak (dense bf16 FLOP/s of one chip). 0 = look it up
    # by device kind (TPU v4-v6e, A100, H100, H200); unknown kinds (CPU) log TFLOP/s only.
    c.peak_flops_per_device = 0.0
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    # Multi-process: a process whose peer has been silent this long (killed, host lost) ends with
    # one error line instead of waiting in a collective until JAX aborts it.
    c.peer_timeout_seconds = 60.0
    c.export_model = True  # write `workdir/model` (save_pretrained format) at the end
    # JAX's persistent compilation cache (train.py): a restarted or resumed run loads its compiled
    # steps instead of compiling again. "" = workdir/compilation_cache; "off" = disabled.
    c.compilation_cache_dir = ""
    return c


# Fields set from a Python value of more than one type: heads as one int (the official
# `num_heads` with `head_mul`) or one per stage.
_ANY_TYPE_FIELDS = ("num_heads",)


def model_fields() -> ml_collections.ConfigDict:
    """`name`, every field of every family's config (HieraConfig, HieraDetConfig) and the official
    `head_mul` as unset, typed placeholders (None = not overridden)."""
    fields = {"name": config_dict.placeholder(str), "head_mul": config_dict.placeholder(float)}
    types = [families.get(name).config_type for name in families.names()]
    every = [f for config_type in types for f in dataclasses.fields(config_type)]
    for field in every:  # each family's fields, the first family's type where they share a name
        if field.name in fields:
            continue
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        kind = type(default) if default is not None else object
        if default is None and str(field.type).startswith("bool"):
            kind = bool  # scan_blocks: None = automatic, True/False from a command line
        if kind is list:
            kind = tuple
        if field.name in _ANY_TYPE_FIELDS:
            kind = object
        fields[field.name] = config_dict.placeholder(kind)
    return ml_collections.ConfigDict(fields)


def model_family(config: ml_collections.ConfigDict) -> families.Family:
    """The family of `model.name` (Hiera's for an unset or unknown name, whose errors list names)."""
    return families.for_name(config.model.get("name"))


def resolve_model_config(config: ml_collections.ConfigDict) -> Any:
    """The model config a training config describes: the `name` variant of its family, then every
    set field (a field the family's config does not have is a one-line error)."""
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    kwargs: dict[str, Any] = {k: v for k, v in model.items() if v is not None}
    name = kwargs.pop("name", None)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return model_family(config).training_config(name, kwargs)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Refuse out-of-range values with one line naming the key, before anything is built."""
    if config.task not in ("mae", "classification"):
        raise ValueError(f"task must be 'mae' or 'classification', got {config.task!r}")
    rules = [
        ("batch_size", lambda v: v >= 1, ">= 1"),
        ("eval_batch_size", lambda v: v >= 0, ">= 0 (0 = batch_size)"),
        ("grad_accum_steps", lambda v: v >= 1, ">= 1"),
        ("total_steps", lambda v: v >= 0, ">= 0 (0 = from num_epochs)"),
        ("num_epochs", lambda v: v >= 0, ">= 0"),
        ("warmup_steps", lambda v: v >= 0, ">= 0"),
        ("warmup_epochs", lambda v: v >= 0, ">= 0"),
        ("log_every", lambda v: v >= 1, ">= 1"),
        ("eval_every", lambda v: v >= -1, ">= -1 (0 = at the end, -1 = never)"),
        ("eval_max_examples", lambda v: v >= 0, ">= 0 (0 = all)"),
        ("checkpoint_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
        ("keep_checkpoints", lambda v: v >= 1, ">= 1"),
        ("peer_timeout_seconds", lambda v: v >= 5, ">= 5"),
        ("num_vis", lambda v: v >= 0, ">= 0"),
        ("shard_min_size", lambda v: v >= 0, ">= 0"),
        ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("peak_flops_per_device", lambda v: v >= 0, ">= 0 (0 = by device kind)"),
        ("optim.lr", lambda v: v > 0, "> 0"),
        ("optim.lr_scaling_batch", lambda v: v >= 0, ">= 0"),
        ("optim.min_lr", lambda v: v >= 0, ">= 0"),
        ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("optim.eps", lambda v: v > 0, "> 0"),
        ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
        ("optim.layer_decay", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("optim.clip_grad_norm", lambda v: v >= 0, ">= 0 (0 = off)"),
        ("data.workers", lambda v: v >= 0, ">= 0"),
        ("data.worker_processes", lambda v: v >= 0, ">= 0"),
        ("data.prefetch", lambda v: v >= 0, ">= 0"),
        ("data.repeated_aug", lambda v: v >= 1, ">= 1"),
        ("data.reprob", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("data.mixup", lambda v: v >= 0, ">= 0"),
        ("data.cutmix", lambda v: v >= 0, ">= 0"),
        ("data.mixup_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("data.mixup_switch_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("data.crop_pct", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("data.num_frames", lambda v: v >= 0, ">= 0"),
        ("data.frame_stride", lambda v: v >= 1, ">= 1"),
        ("data.shuffle_buffer", lambda v: v >= 1, ">= 1"),
        ("model.mask_ratio", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
        ("model.drop_path_rate", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
        ("model.num_classes", lambda v: v is None or v >= 1, ">= 1"),
    ]
    for dotted, ok, text in rules:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None and not dotted.startswith("model."):
            continue  # a key this config does not have
        try:
            good = ok(node)
        except TypeError:
            good = False
        if not good:
            raise ValueError(f"--config.{dotted}={node!r} is out of range: it must be {text}")
    if config.total_steps == 0 and config.num_epochs <= 0:
        raise ValueError("set --config.total_steps or --config.num_epochs to a positive number")
    for name in ("crop_scale", "crop_ratio"):
        lo, hi = (float(v) for v in config.data[name])
        upper = 1.0 if name == "crop_scale" else float("inf")
        if not 0 < lo <= hi <= upper:
            raise ValueError(
                f"--config.data.{name}={tuple(config.data[name])} must be (low, high) with "
                f"0 < low <= high{' <= 1' if upper == 1.0 else ''}"
            )
    resolve_model_config(config)  # an unknown model name or an inconsistent model config
    if len(config.data.mean) != len(config.data.std) or any(v <= 0 for v in config.data.std):
        raise ValueError(
            f"--config.data.mean {tuple(config.data.mean)} and std {tuple(config.data.std)} "
            "must have one entry per channel, std > 0"
        )


def build_model(config: ml_collections.ConfigDict, model_config: Any = None):
    """The module train.py trains for `config` (`model_config`: its model config, if resolved
    already)."""
    model_config = resolve_model_config(config) if model_config is None else model_config
    return families.of_config(model_config).training_model(model_config, config.task)


# ============================================================================ command-line checks
def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path[:arg]` -> its get_config(arg), as `train.py --config` loads it; one-line errors."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        here = os.path.dirname(path) or "."
        known = (
            sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
        )
        hint = f" (in {here}: {', '.join(known)})" if known else ""
        raise FileNotFoundError(f"--config {path}: no such config file{hint}")
    module_spec = importlib.util.spec_from_file_location("hiera_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path} defines no get_config(arg=None)")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise ValueError(f"--config {spec}: {e}") from None


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of a config, nested sections included."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += config_keys(value, prefix + key + ".")
    return keys


def check_overrides(argv: list[str], default_config: str) -> None:
    """Check a `train.py` command line's --config file and --config.KEY overrides before the flag
    parser sees them: a missing file or an unknown key is one line, with the nearest valid keys."""
    import difflib

    spec, overrides = default_config, []
    args = iter(argv[1:])
    for arg in args:
        if arg in ("--config", "-config"):
            spec = next(args, "")
        elif arg.startswith(("--config=", "-config=")):
            spec = arg.split("=", 1)[1]
        elif arg.startswith(("--config.", "--noconfig.")):
            overrides.append(arg.split(".", 1)[1].split("=", 1)[0])
    config = load_config_file(spec)
    keys = config_keys(config)
    for key in overrides:
        if key in keys:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [
            k.rsplit(".", 1)[-1]
            for k in keys
            if (k.rsplit(".", 1)[0] if "." in k else "") == parent
        ]
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"Did you mean {' or '.join('--config.' + k for k in close)}? " if close else ""
        where = f"under {parent}" if parent in keys else "at the top level"
        raise ValueError(
            f"--config.{key}: no such config key. {hint}Keys {where}: {', '.join(siblings)}"
        )
