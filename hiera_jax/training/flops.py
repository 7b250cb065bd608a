"""Model FLOPs of a step (XLA's count) and published peak FLOP/s per chip, for MFU.

MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device), with the peak taken
as the chip's dense bfloat16 figure whatever the compute dtype (float32 runs score low).
"""

from __future__ import annotations

from typing import Any

import jax

# Published dense bfloat16 FLOP/s per chip, matched as lower-case substrings of
# `jax.devices()[0].device_kind`; the first match wins, so specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v6 lite", 918e12),  # TPU v6e (Trillium) reports "TPU v6 lite"
    ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5", 459e12),  # TPU v5p reports "TPU v5"
    ("v4", 275e12),
    ("a100", 312e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Dense bf16 peak FLOP/s of one `device_kind` chip; `override` > 0 wins; None if unknown."""
    if override and override > 0:
        return float(override)
    kind = device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops
    return None


def lowered_flops(lowered: jax.stages.Lowered) -> float | None:
    """XLA's FLOP count of a lowered computation: global (before partitioning), None if absent.

    Remat recompute is counted, and a `lax.scan` body only once: lower a step without either to
    get model FLOPs.
    """
    cost: Any = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def count_flops(fn, *args, **kwargs) -> float | None:
    """FLOPs of `fn(*args, **kwargs)`, traced on abstract arguments (ShapeDtypeStruct) only."""
    return lowered_flops(jax.jit(fn).lower(*args, **kwargs))
