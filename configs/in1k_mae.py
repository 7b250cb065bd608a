"""MAE pretraining on ImageNet-1K, the official Hiera recipe (HIERA_REFERENCE.md §5, paper §4/appx).

`arg` picks the size: tiny | small | base | base_plus | large | huge (default base).

    # one host (8 GPUs or a TPU VM); ImageNet prepared in $TFDS_DATA_DIR, as ArrayRecord (read
    # by grain) or as TFRecord (read by tf.data: pip install -e '.[tf]'), found automatically:
    python train.py --config configs/in1k_mae.py:base --workdir $WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR
    # TPU pod slice (every host runs the same command; the workdir is a gcsfuse mount):
    gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd hiera-jax && \
        python train.py --multi_process --config configs/in1k_mae.py:large --workdir /mnt/gcs/mae_l"

Values from the authors' training branch: AdamW (0.9, 0.95), lr 8e-4 at batch 4096 scaled
linearly, wd 0.05 (not on norms, biases, position embeddings), 40 warmup epochs then cosine to 0,
1600 epochs, mask ratio 0.6, RandomResizedCrop (0.2, 1) + flip, drop path T/S 0, B/B+/L 0.2, H 0.3.
Best guesses (not stated there): bfloat16 compute (the authors used fp16 AMP), remat only for H
(the AOT fit check, BENCHMARKS.md: L without remat fits a v5e-64 at 8.0 of 16 GiB per chip,
1.8 with it, and skips remat's recompute; on fewer chips add --config.model.remat=True; H needs
it on v5e but fits a v5p-64 without it, 23.5 of 95 GiB: add --config.model.remat=False there),
FSDP 8-way for L/H, checkpoint/eval cadence. On fewer chips than the batch needs, keep
batch_size (the lr is tied to it) and add --config.grad_accum_steps=N: the same update (drop
path is drawn per microbatch) with 1/N of the activation memory.
"""

from hiera_jax.training.config import base_config

DROP_PATH = {"tiny": 0.0, "small": 0.0, "base": 0.2, "base_plus": 0.2, "large": 0.2, "huge": 0.3}


def get_config(arg=None):
    size = arg or "base"
    if size not in DROP_PATH:
        raise ValueError(f"size must be one of {sorted(DROP_PATH)}, got {size!r}")
    c = base_config()
    c.task = "mae"
    c.model.update(
        name=f"mae_hiera_{size}_224",  # q_pool=2, decoder 512-d x 8 blocks, 16 heads
        mask_ratio=0.6,
        drop_path_rate=DROP_PATH[size],
        dtype="bfloat16",
        remat=size == "huge",
    )
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.crop_scale = (0.2, 1.0)
    c.data.flip = True
    c.data.workers = 32
    c.data.prefetch = 4
    c.batch_size = 4096
    c.num_epochs = 1600
    c.warmup_epochs = 40
    c.optim.lr = 8e-4
    c.optim.lr_scaling_batch = 4096
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.mesh_shape = (-1, 8 if size in ("large", "huge") else 1)
    c.shard_min_size = 2**18
    c.eval_every = 10_000
    c.eval_max_examples = 10_000
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.log_every = 50
    return c
