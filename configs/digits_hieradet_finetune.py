"""Finetuning SAM 2's Hiera (HieraDet) as a digits classifier, started from the abs-win MAE run.

Run `configs/digits_mae_abswin.py` first: its encoder's tensors are this HieraDet's, key for key
(the window table `pos_embed_win` becomes `pos_embed_window`), because the trunk is sized to it:
the 2-stage digits Hiera, stage-1 attention in 2x2-token windows (the MAE's mask units) and
global attention after the pool, the 4x4 background table. The head is timm's (mean pool,
LayerNorm, linear); the recipe is `digits_finetune.py`'s. `workdir/model` is timm's directory
(`hiera_jax.load_hieradet(path, classifier=True)` reads it).

    python train.py --config configs/digits_mae_abswin.py --workdir runs/digits_mae_abswin
    python train.py --config configs/digits_hieradet_finetune.py --workdir runs/digits_hieradet
    # a SAM 2 / timm / transformers trunk works too, e.g. at SAM 2's own size:
    #   --config.init_from=sam2_hiera_tiny.fb_r896 (then drop the digits-size model fields)
"""

from configs import digits_finetune
from hiera_jax.training.config import model_fields


def get_config(arg=None):
    del arg
    c = digits_finetune.get_config()
    c.model = model_fields()
    c.model.update(
        name="sam2_hiera_tiny",  # SAM 2's block rules; every size field below replaces tiny's
        input_size=(32, 32),
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        num_heads=2,
        stages=(2, 2),
        q_pool=1,
        q_stride=(2, 2),
        window_spec=(2, 0),  # 2x2-token windows (the MAE's mask units), then global
        global_att_blocks=(),
        global_pos_size=(4, 4),
        patch_kernel=(7, 7),
        patch_stride=(4, 4),
        patch_padding=(3, 3),
        drop_path_rate=0.1,
        head_init_scale=0.001,
    )
    c.init_from = "./runs/digits_mae_abswin"
    return c
