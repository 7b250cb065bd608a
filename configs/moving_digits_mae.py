"""Video MAE on moving digits: 8-frame 32x32 clips of a digit bouncing around (made on the fly
from scikit-learn's digits), a small video Hiera with (1, 2, 2) q-strides and 90% masking as in
the paper's video recipe.

    python train.py --config configs/moving_digits_mae.py --workdir runs/moving_digits_mae

Values are best guesses sized for a CPU, not paper values (those are in k400_mae.py).
"""

from hiera_jax.training.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.task = "mae"
    c.model.update(
        name=None,
        input_size=(8, 32, 32),
        in_chans=1,
        num_classes=10,
        embed_dim=48,
        num_heads=1,
        stages=(2, 2),
        q_pool=1,
        q_stride=(1, 2, 2),
        mask_unit_size=(1, 2, 2),
        mask_unit_attn=(True, False),
        patch_kernel=(3, 7, 7),
        patch_stride=(2, 4, 4),
        patch_padding=(1, 3, 3),
        sep_pos_embed=True,
        decoder_embed_dim=48,
        decoder_depth=2,
        decoder_num_heads=1,
        mask_ratio=0.9,
    )
    c.data.source = "moving_digits"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.mean = (0.5,)
    c.data.std = (0.5,)
    c.data.crop_scale = (0.8, 1.0)
    c.data.flip = False
    c.data.crop_pct = 1.0
    c.data.workers = 2
    c.batch_size = 32
    c.num_epochs = 20
    c.warmup_epochs = 2
    c.optim.lr = 1.6e-3
    c.optim.b2 = 0.95
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.eval_batch_size = 32
    c.num_vis = 4
    return c
