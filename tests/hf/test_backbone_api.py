"""`HieraBackbone` as transformers' backbones are used (`BackboneMixin`): stage names, channels,
stage selection by `out_features` / `out_indices`, against transformers' own HieraBackbone."""

import pytest

transformers = pytest.importorskip("transformers")

import hiera_jax  # noqa: E402

SMALL = dict(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], image_size=[64, 64])


@pytest.mark.parametrize(
    "selection",
    [
        {},
        {"out_features": ["stage2", "stage4"]},
        {"out_indices": [0, 3]},
        {"out_features": ["stem", "stage1"], "out_indices": [0, 1]},
        {"out_features": None, "out_indices": None},
    ],
)
def test_backbone_attributes_match_transformers(selection):
    theirs = transformers.HieraBackbone(transformers.HieraConfig(**SMALL, **selection))
    ours = hiera_jax.HieraBackbone(hiera_jax.HieraConfig(**SMALL, **selection))
    assert ours.stage_names == theirs.stage_names
    assert list(ours.out_features) == list(theirs.out_features)
    assert list(ours.out_indices) == list(theirs.out_indices)
    assert list(ours.num_features) == list(theirs.num_features)
    assert ours.out_feature_channels == theirs.out_feature_channels
    assert list(ours.channels) == list(theirs.channels)
    assert ours.backbone_type == theirs.backbone_type.value
    assert ours.has_attentions == theirs.has_attentions


def test_mismatched_selection_is_refused_as_transformers_refuses():
    bad = dict(out_features=["stage1", "stage2"], out_indices=[1, 3])
    with pytest.raises(ValueError):
        transformers.HieraConfig(**SMALL, **bad)
    with pytest.raises(ValueError):
        hiera_jax.HieraConfig(**SMALL, **bad)


def test_forward_with_filtered_kwargs_returns_the_selected_maps():
    import numpy as np

    model = hiera_jax.HieraBackbone(hiera_jax.HieraConfig(**SMALL, out_indices=[1, 4]))
    pixels = np.random.RandomState(0).randn(1, 3, 64, 64).astype(np.float32)
    out = model.forward_with_filtered_kwargs(pixels, output_attentions=True)
    assert [m.shape for m in out.feature_maps] == [(1, 8, 16, 16), (1, 64, 2, 2)]
    assert out.attentions is not None
