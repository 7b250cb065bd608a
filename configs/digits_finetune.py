"""Supervised finetuning of the digits Hiera, initialised from the digits MAE run.

Run `python train.py` (digits MAE) first; this config copies the encoder from
`./runs/digits_mae/model` (written when that run ends) and trains the classifier with the
finetuning recipe scaled down: AdamW (0.9, 0.999), layer-wise lr decay, drop path, label
smoothing, mixup/cutmix, RandAugment. Reports top-1/top-5 on the 359 held-out digits.

    python train.py --config configs/digits_finetune.py --workdir runs/digits_finetune
    python train.py --config configs/digits_finetune.py --config.init_from=''   # from scratch

The values below are best guesses for 32x32 digits, not paper values (those are in in1k_finetune).
"""

from configs import digits_mae
from hiera_jax.training.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.task = "classification"
    c.model.update(digits_mae.digits_model(), drop_path_rate=0.1, head_init_scale=0.001)
    c.init_from = "./runs/digits_mae"
    c.data.source = "digits"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.mean = (0.5,)
    c.data.std = (0.5,)
    c.data.crop_scale = (0.6, 1.0)
    c.data.flip = False
    c.data.crop_pct = 1.0
    c.data.randaug = "rand-m5-mstd0.5-inc1"
    c.data.reprob = 0.1
    c.data.mixup = 0.2
    c.data.cutmix = 0.0
    c.data.workers = 2
    c.label_smoothing = 0.1
    c.batch_size = 128
    c.num_epochs = 40
    c.warmup_epochs = 3
    c.optim.lr = 2e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = 0.75
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.eval_batch_size = 120
    return c
