"""Video MAE pretraining on Kinetics-400 (16x224 clips), after the Hiera paper's video recipe.

`arg` picks the size: base | base_plus | large | huge (default base).

    python train.py --config configs/k400_mae.py:base --workdir $WORKDIR \
        --config.data.name=kinetics400 --config.data.data_dir=$TFDS_DATA_DIR

Kinetics is not in the TFDS catalog as a ready builder: prepare it yourself as a TFDS dataset
(ArrayRecord for grain, or TFRecord for tf.data with `.[tf]`) with a `video` feature (uint8 [T, H, W, 3], e.g. decoded at 30 fps, short
side 320) and a `label` feature, under `data.name` in `data.data_dir`.

From the paper (video MAE, after MAE-ST): mask ratio 0.9, AdamW (0.9, 0.95), lr 8e-4, wd 0.05,
cosine schedule, 16 frames with temporal stride 4, RandomResizedCrop + flip. Best guesses (not
verified against a released recipe): batch 512 with lr given at 512, 800 epochs, 120 warmup
epochs, drop path as for images, bfloat16, remat and 8-way FSDP for L/H. As in MAE-ST, each video
appears 4 times in a row with different crops (`data.repeated_aug=4`; batch_size counts clips,
and an epoch shows every video 4 times). Each repeat decodes the video again.
"""

from hiera_jax.training.config import base_config

DROP_PATH = {"base": 0.2, "base_plus": 0.2, "large": 0.2, "huge": 0.3}


def get_config(arg=None):
    size = arg or "base"
    if size not in DROP_PATH:
        raise ValueError(f"size must be one of {sorted(DROP_PATH)}, got {size!r}")
    c = base_config()
    c.task = "mae"
    c.model.update(
        name=f"mae_hiera_{size}_16x224",  # mask_ratio 0.9 in the registry
        drop_path_rate=DROP_PATH[size],
        dtype="bfloat16",
        remat=size in ("large", "huge"),
    )
    c.data.source = "tfds"
    c.data.name = "kinetics400"
    c.data.image_key = "video"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.frame_stride = 4
    c.data.crop_scale = (0.5, 1.0)  # best guess (MAE-ST jitters scale rather than area)
    c.data.flip = True
    c.data.repeated_aug = 4
    c.data.workers = 32
    c.data.prefetch = 4
    c.batch_size = 512
    c.num_epochs = 800
    c.warmup_epochs = 120
    c.optim.lr = 8e-4
    c.optim.lr_scaling_batch = 512
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.mesh_shape = (-1, 8 if size in ("large", "huge") else 1)
    c.shard_min_size = 2**18
    c.eval_every = 5_000
    c.eval_max_examples = 2_048
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.log_every = 50
    return c
