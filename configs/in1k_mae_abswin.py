"""MAE pretraining on ImageNet-1K of the abs-win Hiera that SAM 2's image encoder starts from.

`arg` picks a SAM 2 size: tiny | small | base_plus | large (default base_plus).

    python train.py --config configs/in1k_mae_abswin.py:base_plus --workdir $WORKDIR \
        --config.data.data_dir=$TFDS_DATA_DIR
    python train.py --config configs/in1k_mae_abswin.py:large --aot v5e:8x8   # TPU fit check

The official MAE recipe of `in1k_mae.py` (same sizes, optimizer, schedule, masking, drop path,
dtype, mesh) with timm's absolute-window position embedding in place of the learned 56x56 table:
a global table of SAM 2's `window_pos_embed_bkg_spatial_size` (7x7; 14x14 for B+) resized to the
token grid at every forward, plus an 8x8 table tiled over the mask units, which is SAM 2's
first-stage window. The encoder's tensors are a HieraDet trunk's (`sam2_hiera_<size>`), key for
key, so a finetune can start SAM 2's trunk from them (`init_from`).
"""

from configs import in1k_mae

GLOBAL_POS_SIZE = {"tiny": (7, 7), "small": (7, 7), "base_plus": (14, 14), "large": (7, 7)}


def get_config(arg=None):
    size = arg or "base_plus"
    if size not in GLOBAL_POS_SIZE:
        raise ValueError(f"size must be one of {sorted(GLOBAL_POS_SIZE)}, got {size!r}")
    c = in1k_mae.get_config(size)
    c.model.abs_win_pos_embed = True
    c.model.global_pos_size = GLOBAL_POS_SIZE[size]
    return c
