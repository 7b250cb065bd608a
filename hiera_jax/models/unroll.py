"""Unroll, reroll and undo-windowing: Hiera's token orderings as pure functions of static shapes.

Hiera keeps tokens in an "unrolled" order in which every q-pool is a max over the leading
chunk of the sequence and every mask unit sits at a fixed stride. These functions move between
that order and the spatial (raster) order; they mirror `hiera_utils.Unroll`/`Reroll`/
`undo_windowing` of the official code step for step, so the two agree token for token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

Shape = Sequence[int]


def unroll(x: jnp.ndarray, size: Shape, schedule: Sequence[Shape]) -> jnp.ndarray:
    """[B, N, C] raster tokens -> [B, N, C] unrolled.

    For each stride (Sy, Sx) of `schedule` the grid [B, H, W, C] is viewed as
    [B, H//Sy, Sy, W//Sx, Sx, C] and the stride axes move to the front: [B·Sy·Sx, H//Sy, W//Sx, C].
    After the whole schedule, `x.reshape(B, 4, N // 4, C).max(1)` is a 2x2 max-pool.
    """
    batch, _, channels = x.shape
    cur_size = list(size)
    x = x.reshape(batch, *cur_size, channels)
    rows = batch
    for strides in schedule:
        cur_size = [n // s for n, s in zip(cur_size, strides)]
        # [B', H//Sy, Sy, W//Sx, Sx, C]
        x = x.reshape(rows, *[d for pair in zip(cur_size, strides) for d in pair], channels)
        ndim = x.ndim
        # -> [B', Sy, Sx, H//Sy, W//Sx, C]
        perm = [0, *range(2, ndim - 1, 2), *range(1, ndim - 1, 2), ndim - 1]
        x = x.transpose(perm)
        rows *= math.prod(strides)
        x = x.reshape(rows, *cur_size, channels)
    return x.reshape(batch, math.prod(size), channels)


def undo_windowing(x: jnp.ndarray, shape: Shape, mu_shape: Shape) -> jnp.ndarray:
    """[B, #MUs, *mu_shape, C] windows -> [B, *shape, C] spatial grid."""
    dims = len(shape)
    batch, channels = x.shape[0], x.shape[-1]
    num_mus = [s // m for s, m in zip(shape, mu_shape)]
    # [B, #MUy, #MUx, MUy, MUx, C] -> [B, #MUy, MUy, #MUx, MUx, C]
    x = x.reshape(batch, *num_mus, *mu_shape, channels)
    perm = [
        0,
        *[a for pair in zip(range(1, 1 + dims), range(1 + dims, 1 + 2 * dims)) for a in pair],
    ]
    x = x.transpose(*perm, x.ndim - 1)
    return x.reshape(batch, *shape, channels)


def reroll(
    x: jnp.ndarray, size: Shape, schedule: Sequence[Shape], *, masked: bool = False
) -> jnp.ndarray:
    """Undo the strides in `schedule` that pooling has not consumed yet.

    Returns [B, #MUs, *mu, C] for masked inputs (only kept units are present) and the spatial
    map [B, *size, C] (channels-last) otherwise. `size` is the token grid at this stage.
    """
    batch, num_tokens, channels = x.shape
    dims = len(size)
    mu_shape = [1] * dims
    for strides in schedule:
        # [B, Sy, Sx, N//(Sy·Sx), MUy, MUx, C] -> [B, N//(Sy·Sx), Sy, MUy, Sx, MUx, C]
        x = x.reshape(batch, *strides, num_tokens // math.prod(strides), *mu_shape, channels)
        ndim = x.ndim
        perm = [
            0,
            1 + dims,
            *[a for pair in zip(range(1, 1 + dims), range(2 + dims, ndim - 1)) for a in pair],
            ndim - 1,
        ]
        x = x.transpose(perm)
        mu_shape = [m * s for m, s in zip(mu_shape, strides)]
        x = x.reshape(batch, -1, *mu_shape, channels)
        num_tokens = x.shape[1]
    x = x.reshape(batch, num_tokens, *mu_shape, channels)
    if masked:
        return x
    return undo_windowing(x, size, mu_shape)
