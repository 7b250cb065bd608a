"""Runs of identical blocks traced and compiled once: `lax.scan` over per-block parameters.

A Hiera stage is one block that may change width, pool queries or switch attention, then blocks
that are all the same but for their drop-path rate; the MAE decoder is eight equal blocks. With
`HieraConfig.scan_blocks`, each such run of two or more blocks is one `lax.scan` whose body is
one block, so XLA compiles each run once instead of once per block.

The parameter tree does not change: blocks keep their own `blocks_{i}` / `decoder_blocks_{i}`
entries, as the converter, `export_state_dict` and checkpoints expect. The scan stacks them on
the fly ([L, ...] per leaf) and applies one unbound block to each slice; gradients flow back to
the per-block entries through the stack. Initialisation runs the blocks one by one (each under
its own name, so `init` draws the same parameters as without the scan) and does not reach this
module; XLA drops init's forward pass anyway, as only parameters come out.

Drop path: the rates become scanned inputs, and the keys are the ones each block would draw
itself (`layers.DropPathKeys`), so training drops the same examples with the scan on and off.
Backward: the body is `jax.checkpoint`ed. With `remat` it saves nothing (as `nn.remat`);
without, it saves the matmul outputs and recomputes elementwise ops, as XLA's fusion does for
unrolled blocks (saving everything would raise peak memory by two thirds; see `run_blocks`).
Either way the values, and so the gradients, are those of the unrolled blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiera_jax.models.kernels.matmul import SAVE_MATMULS
from hiera_jax.models.layers import DropPathInputs, DropPathKeys, HieraBlock


def use_scan(config) -> bool:
    """Whether `config` (a HieraConfig) runs its runs of blocks as scans: `scan_blocks`, or when
    it is None (the default), by JAX's default backend (`auto_scan`)."""
    if not hasattr(config, "scan_blocks"):  # HieraDet: its blocks differ in shape, never scanned
        return False
    if config.scan_blocks is not None:
        return bool(config.scan_blocks)
    return auto_scan(jax.default_backend())


def auto_scan(platform: str) -> bool:
    """`scan_blocks=None` on `platform`: on for the CPU only (its steps ran faster scanned).
    On one H200 the unrolled base steps were 25% faster. On TPU the scanned steps moved far
    more HBM bytes at a higher peak (v5e, 16 per chip: in1k finetune base 1.13 against 0.67
    GB per image, finetune large with remat 5.65 against 2.22, MAE base at 64 per chip 0.72
    against 0.47; BENCHMARKS.md, "Where the bytes go"): the scan buys compile time and code
    size only, so `scan_blocks=True` asks for it."""
    return platform not in ("gpu", "tpu")


def run_blocks(
    parent: nn.Module,
    blocks: Sequence[HieraBlock],
    x: jnp.ndarray,
    *,
    train: bool,
    remat: bool,
) -> jnp.ndarray:
    """x through `blocks` as one scan: [B, N, C] -> [B, N, C].

    `blocks` are unbound (`parent=None`), named as in the tree (`blocks_{i}`) and equal but for
    `drop_path`. Call from `parent`'s compact method when applying (not initialising): the
    parameters are `parent.variables["params"][block.name]`.
    """
    names = [block.name for block in blocks]
    params = parent.variables["params"]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[name] for name in names])
    rates = [block.drop_path for block in blocks]
    drop_inputs = None
    if train and any(rate > 0.0 for rate in rates):
        keep = np.asarray([1.0 - rate for rate in rates])  # Python floats, as DropPath rounds
        drop_inputs = DropPathInputs(
            keys=jnp.stack([DropPathKeys(name=name)() for name in names]),  # [L, 2] keys
            keep_prob=jnp.asarray(keep.astype(np.float32)),
            keep_scale=jnp.asarray(keep.astype(jnp.dtype(blocks[0].dtype))),
        )
    template = blocks[0].clone(parent=None, name=None, drop_path=0.0)

    def body(x: jnp.ndarray, inputs) -> tuple[jnp.ndarray, None]:
        block_params, block_drop = inputs
        return template.apply({"params": block_params}, x, train, False, block_drop), None

    # What the backward keeps of each block. Unrolled, XLA fuses the elementwise ops into the
    # backward and keeps little more than the matmul outputs; a loop body hides that choice, and
    # left to autodiff it keeps every intermediate (MAE base step, batch 64 on a v5e 2x2: peak
    # 2.53 GB per chip unrolled, 4.15 GB so). So the body keeps its matmul outputs and recomputes
    # the elementwise rest (2.47 GB); `remat` keeps nothing, as `nn.remat` does.
    policy = None if remat else SAVE_MATMULS
    body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    x, _ = jax.lax.scan(body, x, (stacked, drop_inputs))
    return x
