"""MAE pretraining of the digits Hiera with SAM 2's absolute-window position embedding.

SAM 2's image encoder (HieraDet) starts from an MAE-pretrained Hiera whose position embedding is
a small global table resized to the token grid plus a window table tiled over the mask units
(timm's `abs_win_pos_embed`, "Window Attention is Bugged", Bolya et al. 2023). This is
`digits_mae.py` with that embedding: a 4x4 global table and a 2x2 (one mask unit) window table.

    python train.py --config configs/digits_mae_abswin.py --workdir runs/digits_mae_abswin
    # its encoder starts a HieraDet classifier (the same tensors, SAM 2's trunk around them):
    python train.py --config configs/digits_hieradet_finetune.py --workdir runs/digits_hieradet
"""

from configs import digits_mae


def get_config(arg=None):
    del arg
    c = digits_mae.get_config()
    c.model.abs_win_pos_embed = True
    c.model.global_pos_size = (4, 4)  # resized (bicubic, antialiased) to the 8x8 token grid
    return c
