"""Masks: exact keep counts, determinism, and token selection identical to the official code."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hiera_jax.models import masking


def test_random_keep_mask_counts_and_determinism():
    key = jax.random.key(0)
    mask = masking.random_keep_mask(key, 16, 49, 0.6)
    assert mask.shape == (16, 49) and mask.dtype == jnp.bool_
    assert np.all(np.asarray(mask).sum(1) == 19)  # int(49 * 0.4), as the official code
    np.testing.assert_array_equal(mask, masking.random_keep_mask(key, 16, 49, 0.6))
    other = masking.random_keep_mask(jax.random.key(1), 16, 49, 0.6)
    assert not np.array_equal(mask, other)
    # Rows differ from each other too (a per-row draw, not one pattern broadcast).
    assert len({tuple(row) for row in np.asarray(mask)}) > 1
    video = masking.random_keep_mask(key, 4, 392, 0.9)
    assert np.all(np.asarray(video).sum(1) == 39)


def test_mask_is_jit_stable_and_uniform():
    draw = jax.jit(lambda k: masking.random_keep_mask(k, 512, 49, 0.6))
    freq = np.asarray(draw(jax.random.key(3))).mean(0)
    assert np.all(np.abs(freq - 19 / 49) < 0.1)  # every unit is kept at about the same rate


def test_select_kept_tokens_matches_official_boolean_indexing():
    rng = np.random.RandomState(0)
    batch, units, mu_size, channels = 3, 49, 64, 5
    x = rng.randn(batch, units * mu_size, channels).astype(np.float32)
    mask = np.zeros((batch, units), bool)
    for row in mask:
        row[rng.permutation(units)[:19]] = True
    mt = torch.from_numpy(mask)
    expected = torch.from_numpy(x)[mt[..., None].tile(1, mu_size, channels)].view(
        batch, -1, channels
    )
    ours = masking.select_kept_tokens(jnp.asarray(x), jnp.asarray(mask), 19)
    np.testing.assert_array_equal(ours, expected.numpy())


def test_scatter_kept_units_inverts_selection():
    rng = np.random.RandomState(1)
    mask = np.zeros((2, 10), bool)
    mask[0, [1, 4, 7]] = True
    mask[1, [0, 2, 9]] = True
    units = rng.randn(2, 3, 2, 2, 4).astype(np.float32)
    fill = np.full((4,), -7.0, np.float32)
    out = np.asarray(
        masking.scatter_kept_units(jnp.asarray(units), jnp.asarray(mask), jnp.asarray(fill))
    )
    for b in range(2):
        np.testing.assert_array_equal(out[b][mask[b]], units[b])
        assert np.all(out[b][~mask[b]] == -7.0)


def test_mask_to_pixels_is_nearest_upsampling():
    mask = np.zeros((1, 4), bool)
    mask[0, 1] = True  # top-right unit of a 2x2 grid
    pixels = np.asarray(masking.mask_to_pixels(jnp.asarray(mask), (2, 2), (64, 64)))
    assert pixels.shape == (1, 64, 64, 1)
    assert pixels[0, :32, 32:].all() and not pixels[0, 32:].any() and not pixels[0, :32, :32].any()
