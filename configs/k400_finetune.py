"""Supervised finetuning on Kinetics-400 (16x224 clips) from a video MAE checkpoint.

`arg` picks the size: base | base_plus | large | huge (default base).

    python train.py --config configs/k400_finetune.py:base --workdir $WORKDIR \
        --config.init_from=$K400_MAE_WORKDIR --config.data.data_dir=$TFDS_DATA_DIR

Data as in k400_mae.py. Best guesses after MAE-ST's finetuning recipe (the Hiera paper defers
to it; not verified): AdamW (0.9, 0.999), lr 1e-3 at batch 256 scaled linearly,
5 warmup epochs, cosine; epochs B/B+ 150, L 100, H 75; layer decay B/B+ 0.75, L/H 0.85; drop path
B/B+ 0.1, L 0.2, H 0.3; RandAugment m7 n4, mixup 0.8, cutmix 1.0, label smoothing 0.1,
random erasing 0.25, repeated augmentation 2 (`data.repeated_aug`); single-clip center-crop
evaluation (the paper reports multi-view).
"""

from hiera_jax.training.config import base_config

RECIPE = {  # epochs, layer decay, drop path
    "base": (150, 0.75, 0.1),
    "base_plus": (150, 0.75, 0.1),
    "large": (100, 0.85, 0.2),
    "huge": (75, 0.85, 0.3),
}


def get_config(arg=None):
    size = arg or "base"
    if size not in RECIPE:
        raise ValueError(f"size must be one of {sorted(RECIPE)}, got {size!r}")
    epochs, layer_decay, drop_path = RECIPE[size]
    c = base_config()
    c.task = "classification"
    c.model.update(
        name=f"hiera_{size}_16x224",
        drop_path_rate=drop_path,
        dtype="bfloat16",
        remat=size in ("large", "huge"),
    )
    c.init_from = ""
    c.data.source = "tfds"
    c.data.name = "kinetics400"
    c.data.image_key = "video"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.frame_stride = 4
    c.data.crop_scale = (0.08, 1.0)
    c.data.flip = True
    c.data.repeated_aug = 2
    c.data.randaug = "rand-m7-n4-mstd0.5-inc1"
    c.data.reprob = 0.25
    c.data.mixup = 0.8
    c.data.cutmix = 1.0
    c.data.crop_pct = 0.875
    c.data.workers = 32
    c.label_smoothing = 0.1
    c.batch_size = 512
    c.num_epochs = epochs
    c.warmup_epochs = 5
    c.optim.lr = 1e-3
    c.optim.lr_scaling_batch = 256
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = layer_decay
    c.mesh_shape = (-1, 8 if size in ("large", "huge") else 1)
    c.shard_min_size = 2**18
    c.eval_every = 2_500
    c.eval_batch_size = 512
    c.checkpoint_every = 2_500
    c.log_every = 50
    return c
