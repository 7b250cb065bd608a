"""Helpers for comparing against the official PyTorch implementation (`hiera-transformer`)."""

from __future__ import annotations

import numpy as np


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the relative error quoted in the closing notes."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def official_model(name: str, seed: int = 0, **kwargs):
    """Official model with random weights, in eval mode, returning logits instead of softmax."""
    import hiera
    import torch

    torch.manual_seed(seed)
    if name.endswith("_16x224") and "input_size" in kwargs:
        # The official video constructors fix input_size; rebuild base with their exact kwargs.
        assert "base_16x224" in name and "plus" not in name, name
        cls = hiera.MaskedAutoencoderHiera if name.startswith("mae_") else hiera.Hiera
        video = dict(
            num_classes=400,
            q_stride=(1, 2, 2),
            mask_unit_size=(1, 8, 8),
            patch_kernel=(3, 7, 7),
            patch_stride=(2, 4, 4),
            patch_padding=(1, 3, 3),
            sep_pos_embed=True,
        )
        if name.startswith("mae_"):
            video["q_pool"] = 2
        model = cls(**video, **kwargs).eval()
    else:
        model = getattr(hiera, name)(**kwargs).eval()
    if hasattr(model, "head"):
        model.head.act_func = lambda x: x  # the official Head applies softmax in eval mode
    # Random LayerNorm affine too, so a swapped scale/bias cannot hide behind the (1, 0.02) init.
    return randomise_norms(model)


def randomise_norms(model):
    """Random LayerNorm affine, so a swapped scale/bias cannot hide behind the constant init."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model


def randomise_hieradet(model, seed: int = 0):
    """Random weights for a SAM 2 trunk (timm, sam2 or transformers) and its neck, sized so every
    part counts: qkv logits of std ~2 (peaked attention), visible position tables, LayerScale
    near 0.5, neck convs at 0.05, random LayerNorm affine; in eval mode."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("attn.qkv.weight"):
                param.normal_(0.0, 1.5 / param.shape[1] ** 0.5)
            elif key.endswith(("pos_embed", "pos_embed_window")):
                param.normal_(0.0, 0.2)
            elif key.endswith(".gamma"):
                param.normal_(0.5, 0.2)
            elif key.startswith("neck."):
                param.normal_(0.0, 0.05)
            else:
                param.normal_(0.0, 0.02)
    return randomise_norms(model).eval()


def to_torch(x: np.ndarray):
    """Channels-last NumPy input -> channels-first torch tensor."""
    import torch

    return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def random_input(shape, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def official_on_meta(name: str, **kwargs):
    """Official model built on the meta device: shapes only, no memory, any size in milliseconds."""
    import hiera
    import torch

    linspace = torch.linspace

    def cpu_linspace(*args, **kw):  # the constructor calls .item() on it, which meta cannot do
        kw["device"] = "cpu"
        return linspace(*args, **kw)

    torch.linspace = cpu_linspace
    try:
        with torch.device("meta"):
            return getattr(hiera, name)(**kwargs)
    finally:
        torch.linspace = linspace
