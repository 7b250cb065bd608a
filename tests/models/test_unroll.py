"""Unroll / reroll: token orderings against the official modules and against each other."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hiera.hiera_utils import Reroll, Unroll
from hiera.hiera_utils import undo_windowing as official_undo_windowing

import hiera_jax
from hiera_jax.models.unroll import reroll, undo_windowing, unroll

CASES = ["hiera_tiny_224", "mae_hiera_tiny_224", "hiera_base_16x224"]


def _config(name):
    if name.endswith("16x224"):
        return hiera_jax.get_config(name, input_size=(8, 64, 64))
    return hiera_jax.get_config(name)


def _official_reroll(cfg):
    schedule, ends = list(cfg.unroll_schedule), list(cfg.stage_ends)
    return Reroll(cfg.input_size, cfg.patch_stride, schedule, ends, cfg.q_pool)


def _raster_tokens(cfg, batch=2, channels=5):
    n = cfg.num_tokens
    return np.random.RandomState(0).randn(batch, n, channels).astype(np.float32)


@pytest.mark.parametrize("name", CASES)
def test_unroll_matches_official(name):
    cfg = _config(name)
    x = _raster_tokens(cfg)
    official = Unroll(cfg.input_size, cfg.patch_stride, list(cfg.unroll_schedule))
    expected = official(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(
        unroll(jnp.asarray(x), cfg.tokens_spatial_shape, cfg.unroll_schedule), expected
    )


@pytest.mark.parametrize("name", CASES)
def test_reroll_inverts_unroll_at_every_stage(name):
    """At each stage end, reroll(unroll(raster) after the pools so far) is the raster grid."""
    cfg = _config(name)
    x = jnp.asarray(_raster_tokens(cfg))
    tokens = unroll(x, cfg.tokens_spatial_shape, cfg.unroll_schedule)
    grid = x.reshape(x.shape[0], *cfg.tokens_spatial_shape, -1)
    official = _official_reroll(cfg)
    for stage, end in enumerate(cfg.stage_ends):
        schedule, size = cfg.reroll_plan(stage)
        assert grid.shape[1:-1] == size
        rolled = reroll(tokens, size, schedule)
        np.testing.assert_array_equal(rolled, grid)
        np.testing.assert_array_equal(
            rolled, official(torch.from_numpy(np.array(tokens)), end).numpy()
        )
        if stage < cfg.q_pool:
            # A q-pool is the max over the leading stride chunk: a max-pool of the grid, still unrolled.
            stride = int(np.prod(cfg.q_stride))
            tokens = tokens.reshape(tokens.shape[0], stride, -1, tokens.shape[-1]).max(axis=1)
            pooled = grid.reshape(
                grid.shape[0],
                *[d for size_i, s in zip(size, cfg.q_stride) for d in (size_i // s, s)],
                grid.shape[-1],
            )
            grid = pooled.max(axis=tuple(range(2, 2 * len(size) + 1, 2)))


def test_masked_reroll_and_undo_windowing_match_official():
    cfg = hiera_jax.get_config("mae_hiera_tiny_224")
    kept_units = 19
    x = np.random.RandomState(1).randn(2, kept_units * 64, 4).astype(np.float32)
    official = _official_reroll(cfg)
    schedule, size = cfg.reroll_plan(0)
    ours = reroll(jnp.asarray(x), size, schedule, masked=True)
    expected = official(torch.from_numpy(x), 0, mask=torch.ones(1)).numpy()
    assert ours.shape == (2, kept_units, 8, 8, 4)
    np.testing.assert_array_equal(ours, expected)

    windows = np.random.RandomState(2).randn(2, 49, 2, 2, 3).astype(np.float32)
    np.testing.assert_array_equal(
        undo_windowing(jnp.asarray(windows), (14, 14), (2, 2)),
        official_undo_windowing(torch.from_numpy(windows), [14, 14], [2, 2]).numpy(),
    )
