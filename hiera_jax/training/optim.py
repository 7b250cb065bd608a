"""AdamW with linear warmup and cosine decay, the MAE/BEiT weight-decay exclusions and
BEiT-style layer-wise learning-rate decay for finetuning.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

_BLOCK = re.compile(r"^blocks_(\d+)$")


def learning_rate(base_lr: float, batch_size: int, lr_scaling_batch: int) -> float:
    """Peak lr: `base_lr` given at `lr_scaling_batch`, scaled linearly to `batch_size` (0: as is)."""
    if lr_scaling_batch and lr_scaling_batch > 0:
        return base_lr * batch_size / lr_scaling_batch
    return base_lr


def schedule(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    """Linear warmup from 0 for `warmup_steps`, then cosine to `min_lr` at `total_steps`."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(int(warmup_steps), 0)
    if warmup_steps >= total_steps:  # a run shorter than its warmup: only the linear ramp
        return optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=min_lr,
    )


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and kernels, not norms, biases, pos embeddings."""

    def rule(path, leaf):
        names = _path_names(path)
        if any("pos_embed" in n for n in names):
            return False
        return leaf.ndim > 1

    return jax.tree_util.tree_map_with_path(rule, params)


def layer_id(names: tuple[str, ...], depth: int) -> int:
    """BEiT layer id: patch/pos embedding 0, block i -> i + 1, everything after -> depth + 1."""
    top = names[0]
    if top == "patch_embed" or top.startswith("pos_embed"):
        return 0
    match = _BLOCK.match(top)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def layer_scales(params: Any, depth: int, decay: float) -> Any:
    """Per-leaf lr multipliers decay ** (depth + 1 - layer_id); all 1 when decay == 1."""

    def rule(path, leaf):
        del leaf
        return float(decay ** (depth + 1 - layer_id(_path_names(path), depth)))

    return jax.tree_util.tree_map_with_path(rule, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed python float (a per-parameter-group lr factor)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def build_optimizer(
    optim_config: Any,
    params: Any,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int,
    depth: int,
) -> tuple[optax.GradientTransformation, Any]:
    """(optax transformation, lr schedule) for `params` (arrays or ShapeDtypeStructs)."""
    lr = schedule(peak_lr, total_steps, warmup_steps, optim_config.min_lr)
    parts = []
    if optim_config.clip_grad_norm and optim_config.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_config.clip_grad_norm))
    parts.append(
        optax.adamw(
            lr,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=decay_mask(params),
        )
    )
    if optim_config.layer_decay and optim_config.layer_decay != 1.0:
        parts.append(scale_by_tree(layer_scales(params, depth, optim_config.layer_decay)))
    return optax.chain(*parts), lr


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def param_names(params: Any) -> list[str]:
    return ["/".join(p) for p in flax.traverse_util.flatten_dict(params)]
