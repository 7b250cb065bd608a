"""Gradient parity with the official PyTorch Hiera on random weights, float32.

The training steps differentiate our modules (the dense layers' own VJP, the scanned blocks and
their remat policy); this checks every parameter's gradient against torch autograd through the
official model, per parameter: max |jax - torch| / max |torch| under 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from helpers.reference import official_model, random_input, rel_err, to_torch

import hiera_jax

pytestmark = pytest.mark.reference
TOL = 1e-4


def _torch_grads(official, loss) -> dict:
    official.zero_grad(set_to_none=True)
    loss.backward()
    grads = {}
    for key, value in official.state_dict().items():
        param = dict(official.named_parameters()).get(key)
        grads[key] = (
            param.grad if param is not None and param.grad is not None else torch.zeros_like(value)
        )
    return grads


def _compare(name, ours, theirs, config, model_type, record) -> None:
    expected = hiera_jax.convert_state_dict(theirs, config, model_type=model_type)
    ours_flat = dict(jax.tree_util.tree_leaves_with_path(ours))
    worst = 0.0
    for path, value in jax.tree_util.tree_leaves_with_path(expected):
        value = np.asarray(value)
        if not np.abs(value).max():
            continue  # a parameter the loss does not reach (e.g. the MAE's unused head)
        err = rel_err(ours_flat[path], value)
        assert err < TOL, (jax.tree_util.keystr(path), err)
        worst = max(worst, err)
    record(name, "official", "param grads (worst)", worst)


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_classifier_gradients(scan_blocks, record_parity):
    name, size = "hiera_tiny_224", (128, 128)
    official = official_model(name, input_size=size)
    config = hiera_jax.get_config(name, input_size=size, scan_blocks=scan_blocks)
    params = hiera_jax.convert_state_dict(official.state_dict(), config)
    x = random_input((2, *size, 3), seed=11)
    labels = np.array([3, 917])
    theirs = _torch_grads(
        official, F.cross_entropy(official(to_torch(x)), torch.from_numpy(labels))
    )
    model = hiera_jax.HieraForImageClassification(config)

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    ours = jax.jit(jax.grad(loss))(params)
    _compare(
        f"{name} @{size} scan={scan_blocks}", ours, theirs, config, "classification", record_parity
    )


def test_mae_gradients_with_given_mask(record_parity):
    name, size = "mae_hiera_tiny_224", (224, 224)
    official = official_model(name, input_size=size)
    config = hiera_jax.get_config(name, input_size=size)
    params = hiera_jax.convert_state_dict(official.state_dict(), config, model_type="pretraining")
    x = random_input((2, *size, 3), seed=12)
    torch.manual_seed(12)
    mask = official.get_random_mask(to_torch(x), mask_ratio=0.6)
    theirs = _torch_grads(official, official(to_torch(x), mask=mask)[0])
    model = hiera_jax.HieraForPreTraining(config)

    def loss(p):
        return model.apply({"params": p}, x, mask=jnp.asarray(mask.numpy()))[0]

    ours = jax.jit(jax.grad(loss))(params)
    _compare(f"{name} @{size}", ours, theirs, config, "pretraining", record_parity)
