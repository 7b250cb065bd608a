"""Model FLOPs of a step (XLA's count) and published peak FLOP/s per chip, for MFU.

MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device), with the peak taken
as the chip's dense bfloat16 figure whatever the compute dtype (float32 runs score low).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np

from hiera_jax.training.cost import chips


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Dense bf16 peak FLOP/s of one `device_kind` device; `override` > 0 wins; None if unknown."""
    if override and override > 0:
        return float(override)
    chip = chips.chip_for(device_kind)
    return chip.peak_bf16_flops if chip else None


def lowered_flops(lowered: jax.stages.Lowered) -> float | None:
    """XLA's FLOP count of a lowered computation: global (before partitioning), None if absent.

    Remat recompute is counted, and a `lax.scan` body only once: lower a step without either to
    get model FLOPs.
    """
    return global_flops(cost_dict(lowered), 1)


def compiled_flops(compiled: jax.stages.Compiled, num_devices: int) -> float | None:
    """XLA's FLOP count of a compiled SPMD program, made global: per-device count x devices.

    The fallback where the backend cannot count a lowered program (TPU). Remat recompute counts,
    and so does work every device repeats (the optimizer update of replicated parameters under
    pure data parallelism), once per device: a small over-count next to a real batch's FLOPs.
    """
    return global_flops(cost_dict(compiled), num_devices)


def cost_dict(stage: jax.stages.Lowered | jax.stages.Compiled) -> dict[str, Any]:
    """XLA's cost analysis of a lowered or compiled program as one dict ({} where none)."""
    cost: Any = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    return dict(cost or {})


def global_flops(cost: dict[str, Any], num_devices: int) -> float | None:
    """The "flops" of a `cost_dict` times `num_devices` (its per-device count made global);
    None where XLA gives no positive count."""
    flops = cost.get("flops")
    return float(flops) * num_devices if flops is not None and flops > 0 else None


def count_flops(fn, *args, platform: str | None = None, **kwargs) -> float | None:
    """FLOPs of `fn(*args, **kwargs)`, traced on abstract arguments (ShapeDtypeStruct) only.

    `platform="cpu"` counts the program as lowered for the CPU whatever the default backend:
    TPU gives no count for a lowered program, and on GPU (jax 0.11.2 on an H200) neither the
    lowered count nor a cross-platform lowering gave one, while the compiled count missed the
    library GEMMs (8x low). The arguments are first placed on a CPU device (abstractly) and
    lowered under a one-device CPU mesh (before that mesh, jit refused them inside a TPU mesh:
    likely why the GPU got no count), then, if that gives nothing, lowered with
    `lowering_platforms`.
    """
    if platform is None:
        return lowered_flops(jax.jit(fn).lower(*args, **kwargs))
    try:
        device = jax.devices(platform)[0]
        on_device = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
            ),
            (args, kwargs),
        )
        # Under a TPU or GPU mesh (as the train loop and the AOT check call this), lower under a
        # one-device mesh of `platform` with the same axis names: the step's sharding
        # constraints still name them, and jit refuses arguments on another platform's devices.
        names = jax.sharding.get_abstract_mesh().axis_names
        one_device = jax.sharding.Mesh(np.array([device]).reshape((1,) * len(names)), names)
        with jax.set_mesh(one_device) if names else contextlib.nullcontext():
            count = lowered_flops(jax.jit(fn).lower(*on_device[0], **on_device[1]))
        if count is not None:
            return count
    except Exception:  # noqa: BLE001 - try the cross-platform lowering next
        pass
    traced = jax.jit(fn).trace(*args, **kwargs)
    return lowered_flops(traced.lower(lowering_platforms=(platform,)))


def model_flops(fn, *args, here: bool = True) -> float | None:
    """Model FLOPs of `fn(*args)`, the first count available: XLA's count of the program lowered
    for this backend (`here`), then lowered for the CPU, then the matmuls of its jaxpr."""
    count = count_flops(fn, *args) if here else None
    if count is None:
        count = count_flops(fn, *args, platform="cpu")
    if count is None:
        count = jaxpr_flops(fn, *args) or None
    return count


def jaxpr_flops(fn, *args, platform: str | None = None, **kwargs) -> float:
    """Matmul and convolution FLOPs of `fn(*args)` read off its jaxpr: no backend involved.

    The fallback where no XLA count of the same program exists (jax 0.11.2 on a GPU gave none for
    a lowered program, and a compiled count that left out the cuBLAS GEMMs). Counts 2·M·N·K per
    `dot_general` and per convolution output (padding taps too), loop bodies times their trip
    count (`scan`), a `shard_map` body times its devices, the largest branch of a `cond` (of a
    platform switch's, the least, or with `platform` the one that platform runs: a TPU kernel's
    recompute included), a Pallas kernel's cost estimate (else its body times its grid), jax's
    cuDNN attention (its matmuls, the backward's recompute included);
    elementwise work is left out, so it reads a few percent below XLA's count of the same step
    (tested on CPU; the base finetune step at batch 256: 14.38 TFLOP here, 14.48 by XLA).
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return float(_jaxpr_flops(closed.jaxpr, platform))


def kernel_recompute_flops(fn, *args, platform: str = "tpu", **kwargs) -> float:
    """What `platform`'s branches of `fn`'s platform switches compute beyond the least branch:
    the Pallas kernels' backward recompute (fc1, attention logits), which a count lowered for
    the CPU does not see. Trace under `tpu.compiling_for` to choose the kernels that chip gets."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    return float(_jaxpr_flops(jaxpr, platform) - _jaxpr_flops(jaxpr, None))


def _platform_branch(eqn, platform: str) -> int:
    """The branch of `platform_index`'s switch that a lowering for `platform` takes: its
    `platforms` name each branch's platforms, None for the default."""
    platforms = eqn.params["platforms"]
    for i, names in enumerate(platforms):
        if names is not None and platform in names:
            return i
    if None not in platforms:
        raise ValueError(f"the platform switch has no branch for {platform!r}: {platforms}")
    return platforms.index(None)


# jax's cuDNN attention primitives and the matmuls of [T, S] x H each does.
_CUDNN_ATTENTION = {"dot_product_attention_fwd_wrapper": 2, "dot_product_attention_bwd_wrapper": 5}


def _jaxpr_flops(jaxpr, platform: str | None = None) -> float:
    import math

    total = 0.0
    platform_indices = {}  # outputs of lax.platform_dependent's platform_index: their branch
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "platform_index":
            branch = _platform_branch(eqn, platform) if platform else None
            platform_indices.update((id(v), branch) for v in eqn.outvars)
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # kernel: one output feature per feature group
            out = eqn.outvars[0].aval.shape
            dn = eqn.params["dimension_numbers"]
            out_features = rhs[dn.rhs_spec[0]]
            total += 2.0 * math.prod(out) * math.prod(rhs) / out_features
        elif name in _CUDNN_ATTENTION:
            # cuDNN's flash attention (jax.nn.dot_product_attention on a GPU), [B, T, N, H]
            # (BTNH) q and k: q kᵀ and p v forward; the backward computes q kᵀ again and four
            # products (dp, ds k, dsᵀ q, pᵀ do).
            q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            pairs = math.prod(q) * k[1]
            total += _CUDNN_ATTENTION[name] * 2.0 * pairs
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr, platform)
        elif name == "cond":
            branches = [_jaxpr_flops(b.jaxpr, platform) for b in eqn.params["branches"]]
            # A platform switch computes one function per platform; a branch above the least
            # recomputes (the attention and MLP kernels): model FLOPs are the least.
            switch = id(eqn.invars[0])
            if switch not in platform_indices:
                total += max(branches)
            elif platform_indices[switch] is None:
                total += min(branches)
            else:
                total += branches[platform_indices[switch]]
        elif name == "shard_map":
            # Its body is one device's share: the count is global, so every device's share.
            shape = eqn.params["mesh"].shape
            devices = math.prod(shape[a] for a in eqn.params["newly_manual_axes"])
            total += devices * _jaxpr_flops(eqn.params["jaxpr"], platform)
        elif name == "pallas_call":
            # A kernel's body runs once per grid step; its cost estimate says what it does.
            estimate = eqn.params.get("cost_estimate")
            if estimate is not None:
                total += float(estimate.flops)
            else:
                grid = eqn.params["grid_mapping"].grid
                total += math.prod(grid) * _jaxpr_flops(eqn.params["jaxpr"], platform)
        else:
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += _jaxpr_flops(inner, platform)
    return total
