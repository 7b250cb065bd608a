"""Any channel count from RGB weights (`hiera_jax.weights.adapt`), checked against timm's rule.

timm's `adapt_input_conv` works on torch `[out, in, kh, kw]` kernels; ours are channels-last
`[kh, kw, in, out]` (image) and `[kt, kh, kw, in, out]` (video), so each comparison moves the axes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiera_jax
from hiera_jax.weights import adapt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHANNELS = (1, 2, 3, 4, 5, 7)


def _timm_adapt(kernel_hwio: np.ndarray, in_chans: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    manipulate = pytest.importorskip("timm.models._manipulate")
    weight = torch.from_numpy(np.ascontiguousarray(kernel_hwio.transpose(3, 2, 0, 1)))
    out = manipulate.adapt_input_conv(in_chans, weight).numpy()
    return out.transpose(2, 3, 1, 0)  # back to [kh, kw, in, out]


@pytest.mark.parametrize("in_chans", CHANNELS)
def test_image_kernel_matches_timm(in_chans):
    kernel = np.random.RandomState(0).randn(7, 7, 3, 96).astype(np.float32)
    ours = adapt.adapt_input_kernel(kernel, in_chans)
    assert ours.shape == (7, 7, in_chans, 96) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _timm_adapt(kernel, in_chans), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("in_chans", (1, 4))
def test_video_kernel_matches_timm_per_frame(in_chans):
    kernel = np.random.RandomState(1).randn(3, 7, 7, 3, 96).astype(np.float32)
    ours = adapt.adapt_input_kernel(kernel, in_chans)
    assert ours.shape == (3, 7, 7, in_chans, 96)
    for t in range(3):  # the rule acts on input channels only, frame by frame
        np.testing.assert_allclose(ours[t], _timm_adapt(kernel[t], in_chans), rtol=1e-6, atol=1e-7)


def test_bad_requests():
    with pytest.raises(ValueError, match="positive integer"):
        adapt.adapt_input_kernel(np.zeros((7, 7, 3, 8), np.float32), 0)
    config = hiera_jax.get_config("mae_hiera_tiny_224")
    with pytest.raises(ValueError, match="MAE .* decoder predicts 3 channels"):
        adapt.adapt_in_chans({}, config, 1, "pretraining")


# A small model, so that forward passes stay fast on CPU.
SMALL = dict(input_size=(64, 64), embed_dim=16, stages=(1, 1, 1, 1), num_classes=5)


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    config = hiera_jax.get_config("hiera_tiny_224", **SMALL)
    model = hiera_jax.HieraForImageClassification(config)
    params = hiera_jax.init_params(model, jax.random.key(0))
    directory = str(tmp_path_factory.mktemp("rgb") / "model")
    hiera_jax.save_pretrained(directory, params, config, model_type="classification")
    return directory, model, params


def test_grey_input_equals_rgb_with_that_grey(rgb_checkpoint):
    """3 -> 1 sums the kernel: grey x on the adapted model == (x, x, x) on the RGB model."""
    directory, rgb_model, rgb_params = rgb_checkpoint
    model, params = hiera_jax.load_pretrained(directory, in_chans=1)
    assert model.config.in_chans == 1
    assert params["patch_embed"]["proj"]["kernel"].shape[-2] == 1
    grey = jax.random.normal(jax.random.key(1), (2, 64, 64, 1))
    out = jax.jit(model.apply)({"params": params}, grey)
    expected = jax.jit(rgb_model.apply)({"params": rgb_params}, jnp.repeat(grey, 3, axis=-1))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        model.apply({"params": params}, jnp.repeat(grey, 3, axis=-1))


def test_four_channels_run(rgb_checkpoint):
    directory, _, rgb_params = rgb_checkpoint
    model, params = hiera_jax.load_pretrained(directory, in_chans=4, input_size=96)
    assert model.config.in_chans == 4 and model.config.input_size == (96, 96)
    kernel = np.asarray(rgb_params["patch_embed"]["proj"]["kernel"])
    np.testing.assert_allclose(
        params["patch_embed"]["proj"]["kernel"],
        np.concatenate([kernel, kernel[:, :, :1]], axis=2) * 0.75,
        rtol=1e-6,
    )
    x = jax.random.normal(jax.random.key(2), (2, 96, 96, 4))
    logits = jax.jit(model.apply)({"params": params}, x)
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))


def test_backbone_and_refused_mae(tmp_path):
    config = hiera_jax.get_config("hiera_tiny_224", **SMALL)
    model = hiera_jax.HieraModel(config)
    params = hiera_jax.init_params(model, jax.random.key(3))
    hiera_jax.save_pretrained(str(tmp_path / "bb"), params, config, model_type="backbone")
    model, params = hiera_jax.load_pretrained(str(tmp_path / "bb"), in_chans=1)
    out = jax.jit(model.apply)({"params": params}, jnp.zeros((1, 64, 64, 1)))
    assert out.pooler_output.shape == (1, config.num_features)

    mae = hiera_jax.get_config("mae_hiera_tiny_224", **SMALL)
    mae_model = hiera_jax.HieraForPreTraining(mae)
    mae_params = hiera_jax.init_params(mae_model, jax.random.key(4))
    hiera_jax.save_pretrained(str(tmp_path / "mae"), mae_params, mae, model_type="pretraining")
    with pytest.raises(ValueError, match="cannot change in_chans of an MAE"):
        hiera_jax.load_pretrained(str(tmp_path / "mae"), in_chans=1)


def test_converter_in_chans_flag(tmp_path):
    """`convert_pytorch.py --in-chans 1` writes a 1-channel model with timm's kernel."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", pretrained=False)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "gray"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "convert", "convert_pytorch.py"),
         "--model", "hiera_tiny_224", "--input", str(weights), "--output", str(out),
         "--in-chans", "1"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["num_channels"] == 1
    _, params = hiera_jax.load_pretrained(str(out))
    expected = _timm_adapt(model.patch_embed.proj.weight.detach().numpy().transpose(2, 3, 1, 0), 1)
    np.testing.assert_allclose(params["patch_embed"]["proj"]["kernel"], expected, rtol=1e-6)
