"""The variant registry and config validation."""

import json

import pytest

import hiera_jax
from hiera_jax import HieraConfig

IMAGE_SIZES = ("tiny", "small", "base", "base_plus", "large", "huge")
VIDEO_SIZES = ("base", "base_plus", "large", "huge")
OFFICIAL_NAMES = sorted(
    [f"hiera_{s}_224" for s in IMAGE_SIZES]
    + [f"hiera_{s}_16x224" for s in VIDEO_SIZES]
    + [f"mae_hiera_{s}_224" for s in IMAGE_SIZES]
    + [f"mae_hiera_{s}_16x224" for s in VIDEO_SIZES]
)


def test_every_official_variant_is_listed():
    assert hiera_jax.list_models() == OFFICIAL_NAMES


def test_mae_variants_pool_twice_and_video_masks_more():
    assert hiera_jax.get_config("hiera_base_224").q_pool == 3
    assert hiera_jax.get_config("mae_hiera_base_224").q_pool == 2
    assert hiera_jax.get_config("mae_hiera_base_224").mask_ratio == 0.6
    video = hiera_jax.get_config("mae_hiera_base_16x224")
    assert (
        video.mask_ratio == 0.9 and video.num_mask_units == 392 and video.num_kept_mask_units == 39
    )


def test_overrides_apply_and_unknown_fields_are_rejected():
    cfg = hiera_jax.get_config("hiera_tiny_224", num_classes=10, drop_path_rate=0.1)
    assert (cfg.num_classes, cfg.drop_path_rate, cfg.embed_dim) == (10, 0.1, 96)
    with pytest.raises(ValueError, match="unknown HieraConfig field.*num_class"):
        hiera_jax.get_config("hiera_tiny_224", num_class=10)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model name 'hiera_tiny_256'.*hiera_base_16x224"):
        hiera_jax.get_config("hiera_tiny_256")
    with pytest.raises(ValueError, match="unknown model name"):
        hiera_jax.create_model("vit_base")


def test_lists_become_tuples_and_dict_round_trips():
    cfg = HieraConfig(input_size=[224, 224], stages=[1, 2, 7, 2])
    assert cfg.stages == (1, 2, 7, 2)
    assert HieraConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mask_unit_size=(6, 6), input_size=(192, 192)), "not divisible by the pooled stride"),
        (dict(input_size=(225, 225)), "not divisible by patch_stride"),
        (dict(q_pool=4), "q_pool=4 is too large"),
        (dict(q_pool=-1), "q_pool=-1 is too large"),
        (dict(input_size=(240, 240)), r"divisible by q_stride \*\* \(len\(stages\) - 1\)"),
        (dict(mask_unit_attn=(True, False)), "mask_unit_attn has 2 entries"),
        (dict(q_stride=(2, 2, 2)), "q_stride=.* has 3 dims"),
        (dict(norm_layer="BatchNorm"), "not supported"),
        (dict(mask_ratio=1.0), "mask_ratio must be in"),
        (dict(num_heads=5), "cannot split into 5 heads"),
        (dict(dtype="float64"), "dtype must be"),
    ],
)
def test_inconsistent_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        hiera_jax.get_config("hiera_tiny_224", **overrides)


def test_block_specs_follow_the_official_constructor():
    from helpers.reference import official_on_meta

    official = official_on_meta("hiera_base_16x224")
    ours = hiera_jax.get_config("hiera_base_16x224").block_specs
    assert len(ours) == len(official.blocks)
    for spec, block in zip(ours, official.blocks, strict=True):
        attn = block.attn
        assert (spec.dim, spec.dim_out, spec.heads) == (block.dim, block.dim_out, attn.heads)
        assert (spec.q_stride, spec.window_size) == (attn.q_stride, attn.window_size)
        assert spec.use_mask_unit_attn == attn.use_mask_unit_attn


def test_transformers_common_attributes_are_kept_and_written(tmp_path):
    """`PretrainedConfig`'s common keyword arguments survive, as transformers keeps them: read
    back as attributes, written by `to_json_file` / `save_pretrained`, read by transformers."""
    transformers = pytest.importorskip("transformers")
    common = dict(
        architectures=["HieraForImageClassification"],
        finetuning_task="imagenet",
        tie_word_embeddings=False,
        is_decoder=False,
        add_cross_attention=False,
        chunk_size_feed_forward=0,
        tokenizer_class=None,
        prefix="p",
        bos_token_id=1,
        pad_token_id=0,
        eos_token_id=2,
        sep_token_id=3,
        decoder_start_token_id=4,
        task_specific_params={"classify": {"top_k": 5}},
    )
    ours = HieraConfig(depths=[1, 2, 7, 2], num_labels=3, **common)
    theirs = transformers.HieraConfig(depths=[1, 2, 7, 2], num_labels=3, **common)
    for key, value in common.items():
        assert getattr(ours, key) == value == getattr(theirs, key), key
    # Defaults of the attributes every transformers config has; others are absent, as there.
    plain = HieraConfig()
    for key in ("architectures", "chunk_size_feed_forward", "is_encoder_decoder"):
        assert getattr(plain, key) == getattr(transformers.HieraConfig(), key), key
    for key in ("finetuning_task", "pad_token_id"):
        assert not hasattr(plain, key) and not hasattr(transformers.HieraConfig(), key), key
    # They describe the file, not the model: equal models compare equal.
    assert ours == HieraConfig(depths=[1, 2, 7, 2], num_labels=3)
    assert ours.replace(num_labels=5).finetuning_task == "imagenet"
    # Written by us, read by transformers; written by transformers, read by us.
    path = tmp_path / "ours.json"
    ours.to_json_file(path)
    read = transformers.HieraConfig.from_json_file(str(path))
    for key, value in common.items():
        assert getattr(read, key) == value, key
    assert read.num_labels == 3 and list(read.depths) == [1, 2, 7, 2]
    theirs.to_json_file(str(tmp_path / "theirs.json"))
    back = HieraConfig.from_json_file(tmp_path / "theirs.json")
    for key, value in common.items():
        assert getattr(back, key) == value, key
    assert back == ours
    assert json.loads(ours.to_json_string()) == ours.to_dict()
    # A caller's dict stays theirs.
    common["task_specific_params"]["classify"]["top_k"] = 1
    assert ours.task_specific_params == {"classify": {"top_k": 5}}
