"""Parity of the (speed-tuned) layers with the official PyTorch model, float32.

Run after every change to `MaskUnitAttention` or the other layers: logits of `hiera_tiny_224`
and the MAE loss / predictions of `mae_hiera_tiny_224` under a fixed mask must match the official
`hiera-transformer` code to a relative error below 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

import hiera_jax

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
hiera = pytest.importorskip("hiera")


def _rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _official(name: str, seed: int):
    torch.manual_seed(seed)
    model = getattr(hiera, name)().eval()
    if hasattr(model, "head"):
        model.head.act_func = lambda x: x  # the official eval head applies softmax
    with torch.no_grad():  # random LayerNorm affine and head, so no parameter hides behind init
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        if hasattr(model, "head"):
            model.head.projection.weight.normal_(0.0, 0.05)
    return model


def _nchw(x: np.ndarray):
    return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def test_classifier_logits_match_official():
    official = _official("hiera_tiny_224", seed=0)
    params = hiera_jax.convert_state_dict(official.state_dict(), "hiera_tiny_224")
    x = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
    with torch.no_grad():
        ref = official(_nchw(x)).numpy()
    logits = hiera_jax.create_model("hiera_tiny_224").apply({"params": params}, x)
    err = _rel(logits, ref)
    print(f"hiera_tiny_224 logits rel err {err:.2e}")
    assert err < 1e-4


def test_mae_loss_and_pred_match_official_with_fixed_mask():
    official = _official("mae_hiera_tiny_224", seed=1)
    params = hiera_jax.convert_state_dict(official.state_dict(), "mae_hiera_tiny_224")
    x = np.random.RandomState(1).randn(2, 224, 224, 3).astype(np.float32)
    rng = np.random.RandomState(2)
    mask = np.zeros((2, 49), bool)
    for row in mask:  # 19 of 49 mask units kept (mask_ratio 0.6), fixed
        row[rng.permutation(49)[:19]] = True
    with torch.no_grad():
        loss_ref, pred_ref, label_ref, _ = official(_nchw(x), mask=torch.from_numpy(mask))
    loss, pred, label, _ = hiera_jax.create_model("mae_hiera_tiny_224").apply(
        {"params": params}, x, mask
    )
    errs = (_rel(pred, pred_ref), _rel(label, label_ref), _rel(loss, loss_ref))
    print("mae_hiera_tiny_224 rel err pred {:.2e} label {:.2e} loss {:.2e}".format(*errs))
    assert max(errs) < 1e-4
