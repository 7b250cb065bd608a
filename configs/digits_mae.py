"""MAE pretraining of a small Hiera on scikit-learn's handwritten digits (the default run).

Runs on one CPU in a few minutes: 1,438 training digits (upscaled to 32x32, one channel), a
2-stage Hiera with 2x2-token mask units (16 units, 60% masked), a 2-block decoder.

    python train.py                                    # this config, workdir ./runs/digits_mae
    python train.py --config configs/digits_mae.py --workdir runs/digits_mae --config.num_epochs=20
"""

from hiera_jax.training.config import base_config


def digits_model():
    """The small Hiera shared by the digits configs (32x32x1 in, 8x8 tokens, 2 stages)."""
    return dict(
        name=None,
        input_size=(32, 32),
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        num_heads=2,
        stages=(2, 2),  # MAE needs mask_unit_size divisible by q_stride ** (stages - 1)
        q_pool=1,
        q_stride=(2, 2),
        mask_unit_size=(2, 2),
        mask_unit_attn=(True, False),
        patch_kernel=(7, 7),
        patch_stride=(4, 4),
        patch_padding=(3, 3),
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=2,
        mask_ratio=0.6,
    )


def get_config(arg=None):
    del arg
    c = base_config()
    c.task = "mae"
    c.model.update(digits_model())
    c.data.source = "digits"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.mean = (0.5,)
    c.data.std = (0.5,)
    c.data.crop_scale = (0.6, 1.0)  # best guess for 32x32 digits (ImageNet uses 0.2-1.0)
    c.data.flip = False  # digits are not mirror-symmetric
    c.data.crop_pct = 1.0
    c.data.workers = 2
    c.batch_size = 128
    c.num_epochs = 60
    c.warmup_epochs = 5
    c.optim.lr = 2e-3
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.eval_batch_size = 128
    c.num_vis = 8
    return c
