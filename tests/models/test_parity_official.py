"""Parity with the official PyTorch Hiera (`hiera-transformer`) on random weights, float32.

Each test builds the official model with random weights, converts its state dict, runs both
on the same input and bounds the relative error max|jax - torch| / max|torch| by 1e-4.
"""

import jax
import numpy as np
import pytest
import torch
from helpers.reference import official_model, random_input, rel_err, to_torch

import hiera_jax
from hiera_jax import HieraModel

pytestmark = pytest.mark.reference
TOL = 1e-4


def _convert(official, name, **overrides):
    config = hiera_jax.get_config(name, **overrides)
    model_type = "pretraining" if name.startswith("mae_") else "classification"
    params = hiera_jax.convert_state_dict(official.state_dict(), config, model_type=model_type)
    return config, params


@pytest.mark.parametrize(
    "name, input_size",
    [("hiera_tiny_224", (224, 224)), ("hiera_base_plus_224", (128, 128))],
)
def test_image_classifier_logits(name, input_size, record_parity):
    official = official_model(name, input_size=input_size)
    config, params = _convert(official, name, input_size=input_size)
    x = random_input((2, *input_size, 3))
    with torch.no_grad():
        expected = official(to_torch(x)).numpy()
    model = hiera_jax.HieraForImageClassification(config)
    logits = jax.jit(model.apply)({"params": params}, x)
    assert (
        record_parity(f"{name} @{input_size}", "official", "logits", rel_err(logits, expected))
        < TOL
    )


def test_backbone_feature_maps_pooled_and_masked_tokens(record_parity):
    name = "hiera_tiny_224"
    official = official_model(name)
    config, params = _convert(official, name)
    backbone_params = {k: v for k, v in params.items() if k != "head"}
    model = HieraModel(config)
    apply = jax.jit(model.apply, static_argnames="return_intermediates")
    x = random_input((2, 224, 224, 3), seed=1)
    with torch.no_grad():
        _, maps = official(to_torch(x), return_intermediates=True)
        last = _last_tokens(official, to_torch(x))
        pooled = official.norm(last.mean(1)).numpy()
    out = apply({"params": backbone_params}, x, return_intermediates=True)
    assert len(out.feature_maps) == 4
    for stage, (ours, theirs) in enumerate(zip(out.feature_maps, maps, strict=True)):
        err = rel_err(ours, theirs.numpy())  # both [B, H, W, C]
        assert record_parity("HieraModel tiny", "official", f"stage {stage + 1} map", err) < TOL
    assert rel_err(out.last_hidden_state, last.numpy()) < TOL
    err = rel_err(out.pooler_output, pooled)
    assert record_parity("HieraModel tiny", "official", "pooled", err) < TOL

    # With a keep-mask the official model returns the kept tokens and [B, #MUs, mu, mu, C] maps.
    torch.manual_seed(3)
    mask = official.get_random_mask(to_torch(x), mask_ratio=0.6)
    with torch.no_grad():
        masked_last, masked_maps = official(to_torch(x), mask=mask, return_intermediates=True)
    out = apply({"params": backbone_params}, x, mask=mask.numpy(), return_intermediates=True)
    with torch.no_grad():  # pooled over the kept tokens, as transformers' MAE-mode HieraModel
        masked_pooled = official.norm(masked_last.mean(dim=1)).numpy()
    assert rel_err(out.pooler_output, masked_pooled) < TOL
    np.testing.assert_array_equal(out.bool_masked_pos, mask.numpy())
    err = rel_err(out.last_hidden_state, masked_last.numpy())
    assert record_parity("HieraModel tiny", "official", "masked tokens", err) < TOL
    for ours, theirs in zip(out.feature_maps, masked_maps, strict=True):
        assert rel_err(ours, theirs.numpy()) < TOL


def _last_tokens(official, x):
    """Tokens after the last block, as the official forward computes them before pooling."""
    tokens = official.patch_embed(x) + official.get_pos_embed()
    tokens = official.unroll(tokens)
    for block in official.blocks:
        tokens = block(tokens)
    return tokens


def _check_mae(name, input_size, mask_ratio, seed, record):
    official = official_model(name, input_size=input_size)
    config, params = _convert(official, name, input_size=input_size, mask_ratio=mask_ratio)
    x = random_input((2, *input_size, 3), seed=seed)
    torch.manual_seed(seed)
    mask = official.get_random_mask(to_torch(x), mask_ratio=mask_ratio)
    with torch.no_grad():
        loss, pred, label, used = official(to_torch(x), mask=mask)
    model = hiera_jax.HieraForPreTraining(config)
    our_loss, our_pred, our_label, our_mask = jax.jit(model.apply)(
        {"params": params}, x, mask=mask.numpy()
    )
    np.testing.assert_array_equal(np.asarray(our_mask), used.numpy())
    tag = f"{name} @{input_size}"
    assert record(tag, "official", "label", rel_err(our_label, label.numpy())) < TOL
    assert record(tag, "official", "pred", rel_err(our_pred, pred.numpy())) < TOL
    assert record(tag, "official", "loss", rel_err(our_loss, loss.numpy())) < TOL


def test_mae_image_loss_predictions_labels_with_given_mask(record_parity):
    _check_mae("mae_hiera_tiny_224", (224, 224), 0.6, seed=4, record=record_parity)


def test_video_classifier_logits_and_feature_maps(record_parity):
    name, input_size = "hiera_base_16x224", (8, 64, 64)  # reduced from 16x224x224 for CI
    official = official_model(name, input_size=input_size)
    config, params = _convert(official, name, input_size=input_size)
    x = random_input((2, *input_size, 3), seed=5)
    with torch.no_grad():
        expected, maps = official(to_torch(x), return_intermediates=True)
    model = hiera_jax.HieraForImageClassification(config)
    logits, features = jax.jit(model.apply, static_argnames="return_features")(
        {"params": params}, x, return_features=True
    )
    err = rel_err(logits, expected.numpy())
    assert record_parity(f"{name} @{input_size}", "official", "logits", err) < TOL
    for ours, theirs in zip(features["feature_maps"], maps, strict=True):
        assert ours.ndim == 5  # [B, T, H, W, C]
        assert rel_err(ours, theirs.numpy()) < TOL


def test_mae_video_loss_predictions_labels_with_given_mask(record_parity):
    # Keeps the official video label layout (first frame of each tubelet, (py, px, C)).
    _check_mae("mae_hiera_base_16x224", (8, 64, 64), 0.5, seed=6, record=record_parity)
