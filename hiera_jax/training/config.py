"""The base ml_collections config every file in `configs/` starts from, and model building."""

from __future__ import annotations

from typing import Any

import ml_collections

from hiera_jax.config import HieraConfig, get_config


def base_config() -> ml_collections.ConfigDict:
    """Every key the training loop reads, with defaults; configs override what they need."""
    c = ml_collections.ConfigDict()
    c.task = "mae"  # "mae" (HieraForPreTraining) or "classification" (HieraForImageClassification)
    c.seed = 0

    # Model: `name` picks a registry variant (hiera_jax.list_models()); every other key is a
    # HieraConfig field overriding it (or, with name=None, the whole config).
    c.model = ml_collections.ConfigDict({"name": "mae_hiera_tiny_224"})
    # Finetuning init: a hiera-jax model directory (save_pretrained / converter output, or a
    # training workdir holding `model/`); its encoder (patch_embed, pos_embed*, blocks_*) is copied.
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
    c.export_model = True  # write `workdir/model` (save_pretrained format) at the end
    # JAX's persistent compilation cache (train.py): a restarted or resumed run loads its compiled
    # steps instead of compiling again. "" = workdir/compilation_cache; "off" = disabled.
    c.compilation_cache_dir = ""
    return c


def hiera_config(config: ml_collections.ConfigDict) -> HieraConfig:
    """The HieraConfig a training config describes."""
    kwargs: dict[str, Any] = (
        dict(config.model.to_dict()) if hasattr(config.model, "to_dict") else dict(config.model)
    )
    name = kwargs.pop("name", None)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if name:
        return get_config(name, **kwargs)
    return HieraConfig().replace(**kwargs)


def build_model(config: ml_collections.ConfigDict):
    from hiera_jax.mae import HieraForPreTraining
    from hiera_jax.model import HieraForImageClassification

    mcfg = hiera_config(config)
    if config.task == "mae":
        return HieraForPreTraining(mcfg)
    if config.task == "classification":
        return HieraForImageClassification(mcfg)
    raise ValueError(f"config.task must be 'mae' or 'classification', got {config.task!r}")
