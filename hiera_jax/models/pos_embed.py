"""Position-embedding resampling, so weights trained at one input size run at another.

The kernels follow PyTorch's `F.interpolate(..., align_corners=False, antialias=False)`: bicubic
(a = -0.75, no clamping of the source coordinate, edge indices clamped) on 2-D token grids, as
MAE/DeiT `interpolate_pos_embed` and HF `interpolate_pos_encoding` do, and linear for the 1-D
temporal table of video models. They are written in NumPy as separable interpolation matrices
(float64), so the result does not depend on torch and equals the input at the native size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hiera_jax.models.config import HieraConfig

_CUBIC_A = -0.75  # torch's bicubic coefficient (PIL and jax.image.resize use -0.5)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions `t` -> [n, 4]."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interpolation_matrix(size_in: int, size_out: int, mode: str = "cubic") -> np.ndarray:
    """[size_out, size_in] matrix M with `M @ x` = torch 1-D interpolation of x (align_corners=False)."""
    matrix = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    dst = np.arange(size_out, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5
    rows = np.arange(size_out)
    if mode == "cubic":
        base = np.floor(src)
        weights = _cubic_weights(src - base)
        for tap in range(4):
            idx = np.clip(base.astype(np.int64) - 1 + tap, 0, size_in - 1)
            np.add.at(matrix, (rows, idx), weights[:, tap])
    elif mode == "linear":
        src = np.maximum(src, 0.0)  # torch clamps negative coordinates for (bi)linear
        lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
        hi = np.minimum(lo + 1, size_in - 1)
        frac = src - lo
        np.add.at(matrix, (rows, lo), 1.0 - frac)
        np.add.at(matrix, (rows, hi), frac)
    else:
        raise ValueError(f"mode must be 'cubic' or 'linear', got {mode!r}")
    return matrix


def antialias_cubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] matrix of torch's `F.interpolate(mode="bicubic", antialias=True)`.

    torch's antialiased kernels follow PIL: the cubic coefficient is a = -0.5 (not -0.75), the
    kernel is stretched by the scale when downsampling, and taps that fall outside the input
    are dropped and the rest renormalised (no edge clamping). The identity at the same size.
    timm's abswin Hiera resizes its global position table this way at every forward.
    """
    a = -0.5

    def cubic(x):
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    scale = size_in / size_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        taps = np.arange(lo, hi)
        weights = cubic((taps - center + 0.5) * invscale)
        total = weights.sum()
        matrix[i, lo:hi] = weights / total if total != 0 else weights
    return matrix


def abswin_pos_embed(
    global_table: Any, window_table: Any, token_grid: Sequence[int], xp: Any = np
) -> Any:
    """timm's abswin position embedding, [1, H·W, C] in raster order, from NHWC tables.

    `global_table` [1, Gh, Gw, C] is resized to the token grid (antialiased bicubic, as timm)
    and `window_table` [1, mu_h, mu_w, C] is tiled over the mask units; the two are added. The
    resize is a pair of constant matrices, so `xp=jax.numpy` traces it (and its gradient).
    """
    _, gh, gw, channels = global_table.shape
    _, wh, ww, _ = window_table.shape
    th, tw = token_grid
    if th % wh or tw % ww:
        raise ValueError(
            f"the token grid {tuple(token_grid)} is not a whole number of windows {(wh, ww)}"
        )
    mh = antialias_cubic_matrix(gh, th).astype(np.float32)
    mw = antialias_cubic_matrix(gw, tw).astype(np.float32)
    resized = xp.einsum("oh,bhwc,pw->bopc", mh, global_table, mw)
    tiled = xp.tile(window_table, (1, th // wh, tw // ww, 1))
    return (resized + tiled).reshape(1, th * tw, channels)


def resize_grid(table: Any, grid_in: Sequence[int], grid_out: Sequence[int], xp: Any = np) -> Any:
    """[1, H*W, C] raster tokens on `grid_in` -> [1, H'*W', C] on `grid_out` (bicubic).

    For a 3-D grid (T, H, W) every frame is resized bicubically in space, then the time axis
    linearly: the two tables of a video model are kept separate, as they were trained. With
    `xp=numpy` (load time) the sums are float64; with `xp=jax.numpy` they are traced with float32
    constant matrices (transformers' per-call `interpolate_pos_encoding`). The same grid returns
    `table` itself.
    """
    grid_in, grid_out = tuple(grid_in), tuple(grid_out)
    channels = table.shape[-1]
    if tuple(table.shape) != (1, math.prod(grid_in), channels):
        raise ValueError(
            f"position table of shape {tuple(table.shape)} does not match the token grid {grid_in}"
        )
    if len(grid_in) != len(grid_out) or not 1 <= len(grid_in) <= 3:
        raise ValueError(f"token grids have 1 to 3 axes, got {grid_in} -> {grid_out}")
    if grid_in == grid_out:
        return table
    modes = {1: ("linear",), 2: ("cubic", "cubic"), 3: ("linear", "cubic", "cubic")}[len(grid_in)]
    traced = xp is not np
    matrices = [
        interpolation_matrix(n_in, n_out, mode).astype(np.float32 if traced else np.float64)
        for n_in, n_out, mode in zip(grid_in, grid_out, modes)
    ]
    x = table.reshape(*grid_in, channels)
    if not traced:
        x = np.asarray(x, np.float64)
    letters_in, letters_out = "thw"[-len(grid_in) :], "sop"[-len(grid_in) :]
    spec = ",".join(f"{o}{i}" for o, i in zip(letters_out, letters_in))
    x = xp.einsum(f"{spec},{letters_in}c->{letters_out}c", *matrices, x)
    x = x.reshape(1, math.prod(grid_out), channels)
    return x.astype(table.dtype)


def resize_pos_embed_params(
    params: Mapping[str, Any], from_config: HieraConfig, to_config: HieraConfig
) -> dict:
    """Params of a model built for `from_config`, with position tables resampled for `to_config`.

    Only `input_size` may differ between the configs: the other fields must give the same
    parameter shapes. Handles `pos_embed` (images), `pos_embed_spatial` / `pos_embed_temporal`
    (video, resized separately) and the MAE `decoder_pos_embed`. The abswin tables
    (`abs_win_pos_embed`) are kept as they are: the model resamples them for its input size.
    """
    if from_config.replace(input_size=to_config.input_size) != to_config:
        raise ValueError(
            "resize_pos_embed_params only changes input_size; the configs differ otherwise"
        )
    if len(from_config.input_size) != len(to_config.input_size):
        raise ValueError(
            f"cannot resample between input sizes {from_config.input_size} and "
            f"{to_config.input_size}: the number of axes differs (image vs video)"
        )
    out = dict(params)
    grid_in, grid_out = from_config.tokens_spatial_shape, to_config.tokens_spatial_shape
    # timm abswin tables do not depend on the input size: the model resizes them each call.
    if "pos_embed" in out and not from_config.abs_win_pos_embed:
        out["pos_embed"] = resize_grid(out["pos_embed"], grid_in, grid_out)
    if "pos_embed_spatial" in out:
        out["pos_embed_spatial"] = resize_grid(out["pos_embed_spatial"], grid_in[1:], grid_out[1:])
    if "pos_embed_temporal" in out:
        out["pos_embed_temporal"] = resize_grid(
            out["pos_embed_temporal"], grid_in[:1], grid_out[:1]
        )
    if "decoder_pos_embed" in out:
        out["decoder_pos_embed"] = resize_grid(
            out["decoder_pos_embed"],
            from_config.tokens_spatial_shape_final,
            to_config.tokens_spatial_shape_final,
        )
    return out
