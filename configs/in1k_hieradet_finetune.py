"""Supervised finetuning of SAM 2's Hiera (HieraDet) on ImageNet-1K, as a classifier.

`arg` picks a SAM 2 size: tiny | small | base_plus | large (default base_plus).

    # from the abs-win MAE run of the same size (configs/in1k_mae_abswin.py):
    python train.py --config configs/in1k_hieradet_finetune.py:base_plus --workdir $WORKDIR \
        --config.init_from=$MAE_ABSWIN_WORKDIR --config.data.data_dir=$TFDS_DATA_DIR
    # or from SAM 2's trained trunk (any load_hieradet name, SAM 2 .pt or transformers Sam2 dir):
    python train.py --config configs/in1k_hieradet_finetune.py:large \
        --config.init_from=sam2_hiera_large.fb_r1024_2pt1 ...
    python train.py --config configs/in1k_hieradet_finetune.py:large --aot v5e:8x8  # fit check

The recipe is `in1k_finetune.py`'s for the Hiera of the same size (optimizer, lr, epochs, layer
decay, drop path, augmentation, bf16, remat and FSDP for L) on `sam2_hiera_<size>` at 224 (a
56x56 token grid: whole 8x8 first-stage windows; a later window larger than its map, L's 16 on
14x14, is zero-padded as SAM 2 does). The head is timm's (mean pool, LayerNorm, linear, weights
x 0.001). Best guess: nothing here was tuned for HieraDet; SAM 2 never
finetuned its trunk as a classifier.
"""

from configs import in1k_finetune

SIZES = ("tiny", "small", "base_plus", "large")


def get_config(arg=None):
    size = arg or "base_plus"
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    c = in1k_finetune.get_config(size)
    drop_path, remat = c.model.drop_path_rate, c.model.remat
    c.model = in1k_finetune.base_config().model  # no Hiera fields left over
    c.model.update(
        name=f"sam2_hiera_{size}",
        input_size=(224, 224),
        num_classes=1000,
        drop_path_rate=drop_path,
        dtype="bfloat16",
        remat=remat,
    )
    return c
