"""Adapting pretrained weights to another number of input channels.

A 3-channel (RGB) checkpoint serves 1-channel (grey, medical, depth) or N-channel (RGB + NIR...)
inputs once its patch-embedding kernel is changed the way timm's
`timm.models._manipulate.adapt_input_conv` changes a first convolution:

- to 1 channel: the kernel summed over its input channels (a grey image then gives the same
  output as the RGB image with that grey value in every channel);
- to N > 1 channels: the kernel repeated ceil(N / C) times along its input channels, cut to N,
  and scaled by C / N (C = the checkpoint's channels, 3 for every official model).

Our kernels are channels-last: `[kh, kw, in, out]` (image) and `[kt, kh, kw, in, out]` (video),
so the input channels are axis -2 (torch's `[out, in, kh, kw]` has them at axis 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from hiera_jax.models.config import HieraConfig

PATCH_KERNEL = ("patch_embed", "proj", "kernel")


def adapt_input_kernel(kernel: Any, in_chans: int) -> np.ndarray:
    """The patch-embedding kernel `[..., in, out]` for `in_chans` input channels (timm's rule)."""
    if int(in_chans) != in_chans or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans}")
    kernel = np.asarray(jax.device_get(kernel))
    if kernel.ndim not in (4, 5):
        raise ValueError(
            f"expected a channels-last conv kernel [kh, kw, in, out] or [kt, kh, kw, in, out], "
            f"got shape {kernel.shape}"
        )
    base = kernel.shape[-2]
    if in_chans == base:
        return kernel
    dtype = kernel.dtype
    work = kernel.astype(np.float32)
    if in_chans == 1:
        work = work.sum(axis=-2, keepdims=True)
    else:
        repeat = math.ceil(in_chans / base)
        work = np.concatenate([work] * repeat, axis=-2)[..., :in_chans, :]
        work = work * np.float32(base / float(in_chans))
    return work.astype(dtype)


def adapt_in_chans(
    params: Mapping[str, Any], config: HieraConfig, in_chans: int, model_type: str
) -> tuple[dict, HieraConfig]:
    """`(params, config)` for `in_chans` input channels; only the patch-embedding kernel changes.

    MAE models (`model_type="pretraining"`) are refused: their decoder predicts
    `in_chans * patch_pixels` values per token, which a kernel change cannot adapt.
    """
    if in_chans == config.in_chans:
        return dict(params), config
    if model_type == "pretraining":
        raise ValueError(
            f"cannot change in_chans of an MAE (pretraining) model from {config.in_chans} to "
            f"{in_chans}: its decoder predicts {config.in_chans} channels per pixel; adapt a "
            "classification or backbone model instead"
        )
    params = dict(params)
    inner = params.get("params", None)
    tree = dict(inner) if isinstance(inner, Mapping) else params
    try:
        kernel = tree["patch_embed"]["proj"]["kernel"]
    except (KeyError, TypeError) as err:
        raise ValueError("params have no patch_embed/proj/kernel to adapt") from err
    if kernel.shape[-2] != config.in_chans:
        raise ValueError(
            f"patch_embed/proj/kernel has {kernel.shape[-2]} input channels but the config says "
            f"in_chans={config.in_chans}"
        )
    proj = dict(tree["patch_embed"]["proj"], kernel=adapt_input_kernel(kernel, in_chans))
    tree["patch_embed"] = dict(tree["patch_embed"], proj=proj)
    if isinstance(inner, Mapping):
        params["params"] = tree
    else:
        params = tree
    return params, config.replace(in_chans=int(in_chans))
