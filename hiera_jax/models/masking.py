"""Mask-unit masking as pure functions with static shapes.

A keep-mask is boolean `[B, #MUs]`, True = kept (the official convention). Every example keeps
the same number of units, so the kept tokens form a dense `[B, N_kept, C]` array whose size is
known at trace time: a model jits once per mask ratio and shards like any other batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def num_kept(num_mask_units: int, mask_ratio: float) -> int:
    """Kept units per example, rounded as official `get_random_mask` does."""
    return int(num_mask_units * (1 - mask_ratio))


def random_noise(key: jax.Array, batch: int, num_mask_units: int) -> jnp.ndarray:
    """Uniform noise [B, #MUs]: the units with the lowest noise are kept (`mask_from_noise`)."""
    return jax.random.uniform(key, (batch, num_mask_units))


def random_keep_mask(
    key: jax.Array, batch: int, num_mask_units: int, mask_ratio: float
) -> jnp.ndarray:
    """Keep the `num_kept` units with the lowest uniform noise in each row (official recipe)."""
    noise = random_noise(key, batch, num_mask_units)
    return mask_from_noise(noise, num_kept(num_mask_units, mask_ratio))


def mask_from_noise(noise: jnp.ndarray, keep: int) -> jnp.ndarray:
    """[B, #MUs] float noise -> keep-mask that keeps the `keep` lowest-noise units of each row.

    Hugging Face's `random_masking` (and official `get_random_mask`) rule: argsort the noise and
    keep the first `keep` units. Ties go to the lower index (a stable sort).
    """
    noise = jnp.asarray(noise)
    if noise.ndim != 2:
        raise ValueError(f"noise must be [batch, num_mask_units], got shape {tuple(noise.shape)}")
    order = jnp.argsort(noise, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    return rank < keep


def ids_restore(noise: jnp.ndarray) -> jnp.ndarray:
    """[B, #MUs] -> Hugging Face's `ids_restore`: each unit's place in the noise's ascending order.

    `argsort(argsort(noise))`, the inverse of the shuffle that puts kept units first; a boolean
    array (False first) gives the order of a given mask.
    """
    order = jnp.argsort(jnp.asarray(noise), axis=1, stable=True)
    return jnp.argsort(order, axis=1, stable=True).astype(jnp.int32)


def check_mask(mask: jax.Array, batch: int, num_mask_units: int, keep: int) -> None:
    """Raise ValueError for a concrete mask of the wrong shape or keep count.

    A traced mask can only be checked for shape; its counts are guarded by `count_guard`.
    """
    if mask.shape != (batch, num_mask_units):
        raise ValueError(
            f"mask must have shape [batch, num_mask_units] = {(batch, num_mask_units)}, "
            f"got {tuple(mask.shape)}"
        )
    try:
        counts = np.asarray(mask).astype(bool).sum(axis=-1)
    except jax.errors.TracerArrayConversionError:
        return
    if not np.all(counts == keep):
        raise ValueError(
            f"every mask row must keep exactly {keep} of {num_mask_units} mask units "
            f"(int(num_mask_units * (1 - mask_ratio))); got kept counts {sorted(set(counts.tolist()))}. "
            "Set mask_ratio in the config to match the mask."
        )


def count_guard(mask: jnp.ndarray, keep: int) -> jnp.ndarray:
    """1.0 where each row keeps exactly `keep` units, NaN otherwise (for traced masks)."""
    ok = jnp.all(mask.sum(axis=-1) == keep)
    return jnp.where(ok, 1.0, jnp.nan)


def kept_indices(mask: jnp.ndarray, keep: int) -> jnp.ndarray:
    """[B, keep] indices of the kept units, in increasing order (a stable sort of ~mask)."""
    return jnp.argsort(~mask, axis=1, stable=True)[:, :keep]


def select_kept_tokens(x: jnp.ndarray, mask: jnp.ndarray, keep: int) -> jnp.ndarray:
    """Kept tokens of unrolled `x` [B, N, C]: token n belongs to mask unit n % #MUs.

    Same order as the official `x[mask.tile(1, mu_size, C)]`: for each within-unit position,
    the kept units in increasing order.
    """
    batch, num_tokens, channels = x.shape
    num_units = mask.shape[1]
    idx = kept_indices(mask, keep)  # [B, K]
    x = x.reshape(batch, num_tokens // num_units, num_units, channels)
    x = jnp.take_along_axis(x, idx[:, None, :, None], axis=2)  # [B, N/#MU, K, C]
    return x.reshape(batch, -1, channels)


def scatter_kept_units(units: jnp.ndarray, mask: jnp.ndarray, fill: jnp.ndarray) -> jnp.ndarray:
    """Put kept units [B, K, ...] back at their places in [B, #MUs, ...]; `fill` elsewhere."""
    rank = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, units.shape[1] - 1)  # [B, #MUs]
    gathered = jnp.take_along_axis(
        units, rank.reshape(rank.shape + (1,) * (units.ndim - 2)), axis=1
    )
    where = mask.reshape(mask.shape + (1,) * (units.ndim - 2))
    return jnp.where(where, gathered, fill.astype(units.dtype))


def mask_to_pixels(mask: jnp.ndarray, mask_spatial_shape, input_spatial_shape) -> jnp.ndarray:
    """[B, #MUs] -> [B, *input_spatial_shape, 1] by nearest upsampling (official masked conv)."""
    batch = mask.shape[0]
    grid = mask.reshape(batch, *mask_spatial_shape)
    for axis, (small, big) in enumerate(zip(mask_spatial_shape, input_spatial_shape)):
        grid = jnp.repeat(grid, big // small, axis=axis + 1)
    return grid[..., None]
