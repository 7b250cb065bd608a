"""Supervised finetuning on ImageNet-1K from an MAE checkpoint, the official Hiera recipe.

`arg` picks the size: tiny | small | base | base_plus | large | huge (default base).

    python train.py --config configs/in1k_finetune.py:base --workdir $WORKDIR \
        --config.init_from=$MAE_WORKDIR --config.data.data_dir=$TFDS_DATA_DIR
    # from the released MAE weights, converted once:
    hiera-jax-convert --model mae_hiera_base_224 \
            --input mae_hiera_base_224.pth --output /tmp/mae_b && \
        python train.py --config configs/in1k_finetune.py:base --config.init_from=/tmp/mae_b ...

Values from the authors' training branch: AdamW (0.9, 0.999), lr T/S/B 2e-3, B+/L/H 1e-3 at
batch 1024 scaled linearly, wd 0.05 with the MAE exclusions, 5 warmup epochs, cosine to 0,
epochs T 300, S 200, B/B+ 100, L/H 50; layer decay T/S 0.65, B/B+ 0.7, L/H 0.85; drop path 0.1
(H 0.3); RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, switch
prob 0.5, label smoothing 0.1; eval resize 256 + center crop 224 (crop_pct 0.875).
Best guesses: bfloat16 compute (they used fp16 AMP), remat/FSDP for L/H, eval cadence, and
16 input processes per host (RandAugment in PIL holds the GIL; tune to the host's cores).
Short of memory for batch 1024: --config.grad_accum_steps=N keeps the batch and the lr.
"""

from hiera_jax.training.config import base_config

RECIPE = {  # lr at batch 1024, epochs, layer decay, drop path
    "tiny": (2e-3, 300, 0.65, 0.1),
    "small": (2e-3, 200, 0.65, 0.1),
    "base": (2e-3, 100, 0.7, 0.1),
    "base_plus": (1e-3, 100, 0.7, 0.1),
    "large": (1e-3, 50, 0.85, 0.1),
    "huge": (1e-3, 50, 0.85, 0.3),
}


def get_config(arg=None):
    size = arg or "base"
    if size not in RECIPE:
        raise ValueError(f"size must be one of {sorted(RECIPE)}, got {size!r}")
    lr, epochs, layer_decay, drop_path = RECIPE[size]
    c = base_config()
    c.task = "classification"
    # The classifier pools 3 times; MAE checkpoints (q_pool 2) share every encoder tensor shape.
    c.model.update(
        name=f"hiera_{size}_224",
        drop_path_rate=drop_path,
        dtype="bfloat16",
        remat=size in ("large", "huge"),
    )
    c.init_from = ""  # set to an MAE workdir or a converted mae_hiera_* directory
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.crop_scale = (0.08, 1.0)  # timm create_transform default
    c.data.flip = True
    c.data.randaug = "rand-m9-mstd0.5-inc1"
    c.data.reprob = 0.25
    c.data.mixup = 0.8
    c.data.cutmix = 1.0
    c.data.mixup_switch_prob = 0.5
    c.data.crop_pct = 0.875
    c.data.workers = 4
    c.data.worker_processes = 16
    c.data.prefetch = 4
    c.label_smoothing = 0.1
    c.batch_size = 1024
    c.num_epochs = epochs
    c.warmup_epochs = 5
    c.optim.lr = lr
    c.optim.lr_scaling_batch = 1024
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = layer_decay
    c.mesh_shape = (-1, 8 if size in ("large", "huge") else 1)
    c.shard_min_size = 2**18
    c.eval_every = 2_500
    c.eval_batch_size = 1024
    c.checkpoint_every = 2_500
    c.keep_checkpoints = 3
    c.log_every = 50
    return c
