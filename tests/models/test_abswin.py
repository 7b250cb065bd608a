"""timm's abswin variants (`hiera_small_abswin_256`, `hiera_base_abswin_256`) against timm.

Random timm weights (LayerNorm affine, LayerScale and the zero-initialised head randomised so
parity bites), converted with our converter and compared in float32 at small inputs: timm
builds these models for any `img_size` that is a multiple of 32 (it has no dynamic_img_size),
resizing the global position table at every forward, and so do we from `input_size`.
"""

import math

import jax
import numpy as np
import pytest
import torch
from helpers.reference import random_input, rel_err, to_torch

import hiera_jax
from hiera_jax.models import pos_embed
from hiera_jax.models.factory import init_params

pytestmark = pytest.mark.reference
TOL = 1e-4
NAMES = ("hiera_small_abswin_256", "hiera_base_abswin_256")


def _timm(name, size, seed=0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=(size, size)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        for key, param in model.named_parameters():
            if key.endswith(".gamma"):  # LayerScale starts at 1e-5: make the branches count
                param.normal_(0.5, 0.2)
            elif not param.any():  # timm's jax init zeroes the head
                param.normal_(0.0, 0.02)
    return model


def _apply(model, params, x, **kw):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, **kw))(params, x)


def test_registry_matches_timm_kwargs():
    import timm

    assert set(NAMES) <= set(hiera_jax.list_models(include_timm=True))
    assert not set(NAMES) & set(hiera_jax.list_models())  # the official list is unchanged
    small = hiera_jax.get_config("hiera_small_abswin_256")
    assert small.input_size == (256, 256) and small.global_pos_size == (16, 16)
    assert small.init_values == 1e-5 and small.weight_init == "jax"
    assert not small.use_expand_proj and small.stages == (1, 2, 11, 2)
    base = hiera_jax.get_config("hiera_base_abswin_256")
    assert base.global_pos_size == (14, 14) and base.use_expand_proj
    assert isinstance(hiera_jax.create_model(NAMES[0]), hiera_jax.HieraForImageClassification)
    # Full-size key-for-key check: every timm tensor finds its parameter, with its shape.
    for name in NAMES:
        with torch.device("meta"):
            reference = timm.create_model(name, pretrained=False)
        cfg = hiera_jax.get_config(name)
        shapes = {
            k: tuple(np.shape(v))
            for k, v in hiera_jax.export_state_dict(
                jax.tree.map(
                    lambda s: np.zeros(s.shape, np.float32),
                    hiera_jax.weights.convert.abstract_params(cfg, "classification"),
                ),
                cfg,
            ).items()
        }
        expected = {
            k.replace("head.fc.", "head.projection.").replace("head.norm.", "norm."): tuple(v.shape)
            for k, v in reference.state_dict().items()
        }
        assert shapes == expected, name
    with pytest.raises(ValueError, match="abs_win_pos_embed is for image models"):
        hiera_jax.get_config("hiera_base_16x224", abs_win_pos_embed=True)
    with pytest.raises(ValueError, match="use_expand_proj=False.*dim_mul=2"):
        hiera_jax.get_config("hiera_small_abswin_256", dim_mul=3.0)


def test_abswin_position_table_is_timm_interpolation():
    """The antialiased bicubic of timm's forward, up and down (float64, any grid)."""
    import torch.nn.functional as F

    rng = np.random.RandomState(0)
    for grid_in, grid_out in [((16, 16), (64, 64)), ((14, 14), (48, 48)), ((14, 16), (8, 24))]:
        table = rng.randn(1, 5, *grid_in)
        expected = F.interpolate(
            torch.from_numpy(table), size=grid_out, mode="bicubic", antialias=True
        ).numpy()
        mh = pos_embed.antialias_cubic_matrix(grid_in[0], grid_out[0])
        mw = pos_embed.antialias_cubic_matrix(grid_in[1], grid_out[1])
        np.testing.assert_allclose(
            np.einsum("oh,bchw,pw->bcop", mh, table, mw), expected, atol=1e-12
        )
    np.testing.assert_array_equal(pos_embed.antialias_cubic_matrix(16, 16), np.eye(16))


@pytest.mark.parametrize(
    "name,size", [("hiera_small_abswin_256", 128), ("hiera_base_abswin_256", 64)]
)
def test_logits_feature_maps_and_masked_tokens_match_timm(name, size, record_parity):
    reference = _timm(name, size)
    cfg = hiera_jax.get_config(name, input_size=(size, size))
    params = hiera_jax.convert_state_dict(reference.state_dict(), cfg, source="timm")
    auto = hiera_jax.convert_state_dict(reference.state_dict(), cfg, source="auto")
    jax.tree.map(np.testing.assert_array_equal, params, auto)
    x = random_input((2, size, size, 3), seed=1)
    label = f"{name} @({size}, {size})"
    with torch.no_grad():
        logits = reference(to_torch(x)).numpy()
        maps = reference.forward_intermediates(
            to_torch(x), output_fmt="NHWC", intermediates_only=True
        )
        torch.manual_seed(2)
        mask = reference.get_random_mask(to_torch(x), 0.6)
        masked = reference.forward_features(to_torch(x), mask=mask).numpy()
    ours = _apply(hiera_jax.HieraForImageClassification(cfg), params, x)
    assert record_parity(label, "timm", "logits", rel_err(ours, logits)) < TOL

    backbone = hiera_jax.HieraModel(cfg)
    backbone_params = {k: v for k, v in params.items() if k != "head"}
    out = _apply(backbone, backbone_params, x, return_intermediates=True)
    worst = max(rel_err(a, b.numpy()) for a, b in zip(out.feature_maps, maps, strict=True))
    assert record_parity(label, "timm", "feature maps (forward_intermediates)", worst) < TOL
    out = _apply(backbone, backbone_params, x, mask=mask.numpy())
    err = rel_err(out.last_hidden_state, masked)
    assert record_parity(label, "timm", "masked tokens", err) < TOL


def test_other_input_sizes_resize_like_timm(record_parity):
    """One set of weights at 192 (global table upsampled 16 -> 48) and 32 (downsampled to 8)."""
    name = "hiera_small_abswin_256"
    weights = _timm(name, 256, seed=3).state_dict()
    params = hiera_jax.convert_state_dict(weights, name, source="timm")
    for size in (192, 32):
        reference = _timm(name, size)
        reference.load_state_dict(weights)  # the same tensors: no shape depends on img_size
        cfg = hiera_jax.get_config(name, input_size=(size, size))
        x = random_input((1, size, size, 3), seed=size)
        with torch.no_grad():
            expected = reference(to_torch(x)).numpy()
        ours = _apply(hiera_jax.HieraForImageClassification(cfg), params, x)
        err = rel_err(ours, expected)
        assert record_parity(f"{name} @({size}, {size})", "timm", "logits", err) < TOL
        # load_pretrained's resampling step leaves the abswin tables alone.
        resized = pos_embed.resize_pos_embed_params(params, hiera_jax.get_config(name), cfg)
        jax.tree.map(np.testing.assert_array_equal, resized, params)


def test_export_loads_into_timm_and_round_trips():
    import timm
    from timm.models.hiera import checkpoint_filter_fn

    name = "hiera_base_abswin_256"
    cfg = hiera_jax.get_config(name, input_size=(64, 64))
    model = hiera_jax.HieraForImageClassification(cfg)
    params = init_params(model, jax.random.key(4))
    params = jax.tree.map(lambda p: p + 0.01 * np.random.RandomState(0).randn(*p.shape), params)
    exported = hiera_jax.export_state_dict(params, cfg)
    assert exported["pos_embed"].shape == (1, 96, 14, 14)
    assert exported["pos_embed_win"].shape == (1, 96, 8, 8)
    reference = timm.create_model(name, pretrained=False, img_size=(64, 64)).eval()
    sd = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in exported.items()})
    reference.load_state_dict(sd, strict=True)
    x = random_input((1, 64, 64, 3), seed=5)
    with torch.no_grad():
        expected = reference(to_torch(x)).numpy()
    assert rel_err(_apply(model, params, x), expected) < TOL
    again = hiera_jax.convert_state_dict(exported, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))
    # Older timm checkpoints call the global table pos_embed_abs.
    renamed = {("pos_embed_abs" if k == "pos_embed" else k): v for k, v in sd.items()}
    again = hiera_jax.convert_state_dict(renamed, cfg, source="timm")
    np.testing.assert_array_equal(again["pos_embed"], np.asarray(params["pos_embed"]))


def test_initialisation_follows_timm():
    """timm's jax init + fix_init: zero head, LayerScale 1e-5, torch LayerNorm, rescaled proj."""
    import timm

    name = "hiera_small_abswin_256"
    cfg = hiera_jax.get_config(name, input_size=(64, 64))
    params = init_params(hiera_jax.HieraForImageClassification(cfg), jax.random.key(0))
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, img_size=(64, 64))
    ours = hiera_jax.export_state_dict(params, cfg)
    theirs = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    theirs = {
        k.replace("head.fc.", "head.projection.").replace("head.norm.", "norm."): v
        for k, v in theirs.items()
    }
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = ours[key], theirs[key]
        if key.endswith(("norm1.weight", "norm2.weight", "gamma", ".bias")) or "head" in key:
            if not key.endswith("mlp.fc1.bias") and not key.endswith("mlp.fc2.bias"):
                np.testing.assert_array_equal(a, b, err_msg=key)  # constants
                continue
        # Random tensors: the same spread, within sampling noise (both stds vary ~1/sqrt(2n)).
        np.testing.assert_allclose(a.std(), b.std(), rtol=max(0.05, 5 / a.size**0.5), err_msg=key)
    assert np.all(ours["head.projection.weight"] == 0) and np.all(
        ours["blocks.3.ls1.gamma"] == 1e-5
    )
    # The official variants keep their init: LayerScale and the jax init are opt-in.
    official = init_params(
        hiera_jax.create_model("hiera_tiny_224", input_size=(64, 64)), jax.random.key(0)
    )
    assert "ls1" not in official["blocks_0"] and official["norm"]["bias"][0] == np.float32(0.02)


def test_abswin_mae_matches_the_official_mae_with_timms_abswin_embedding(record_parity):
    """MAE with SAM 2's position embedding (`configs/*_mae_abswin.py`): loss, predictions and
    labels against the official `MaskedAutoencoderHiera` whose position table is replaced by
    timm's `Hiera._pos_embed` (global table resized to the grid + tiled window table) on the same
    two tables. timm's Hiera has no decoder and the official one no abs-win embedding: together
    they are the reference."""
    import hiera as official_hiera
    from helpers.reference import official_model
    from timm.models.hiera import Hiera as TimmHiera

    size, name = (128, 128), "mae_hiera_tiny_224"
    reference = official_model(name, input_size=size)
    torch.manual_seed(7)
    dim = reference.patch_embed.proj.out_channels
    del reference.pos_embed  # the learned 32x32 table, replaced by the two abs-win tables
    reference.pos_embed = torch.nn.Parameter(torch.randn(1, dim, 7, 7) * 0.5)
    reference.pos_embed_win = torch.nn.Parameter(torch.randn(1, dim, 8, 8) * 0.5)
    tokens = torch.zeros(1, math.prod(reference.tokens_spatial_shape), dim)
    reference.get_pos_embed = lambda: TimmHiera._pos_embed(reference, tokens)
    assert isinstance(reference, official_hiera.MaskedAutoencoderHiera)

    cfg = hiera_jax.get_config(
        name, input_size=size, abs_win_pos_embed=True, global_pos_size=(7, 7), mask_ratio=0.6
    )
    params = hiera_jax.convert_state_dict(reference.state_dict(), cfg, model_type="pretraining")
    assert params["pos_embed"].shape == (1, 7, 7, dim)  # NCHW tables -> NHWC
    x = random_input((2, *size, 3), seed=8)
    torch.manual_seed(9)
    mask = reference.get_random_mask(to_torch(x), mask_ratio=0.6)
    with torch.no_grad():
        loss, pred, label, used = reference(to_torch(x), mask=mask)
    model = hiera_jax.HieraForPreTraining(cfg)
    our_loss, our_pred, our_label, our_mask = _apply(model, params, x, mask=mask.numpy())
    np.testing.assert_array_equal(np.asarray(our_mask), used.numpy())
    tag = f"{name} abs-win @{size}"
    assert record_parity(tag, "official + timm", "label", rel_err(our_label, label.numpy())) < TOL
    assert record_parity(tag, "official + timm", "pred", rel_err(our_pred, pred.numpy())) < TOL
    assert record_parity(tag, "official + timm", "loss", rel_err(our_loss, loss.numpy())) < TOL
