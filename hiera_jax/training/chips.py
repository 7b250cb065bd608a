"""Published figures of accelerator chips, per JAX device: dense bf16 peak, HBM size and bandwidth.

Used for MFU (peak FLOP/s) and by the ahead-of-time fit check (HBM, roofline). A JAX device is
one chip on v4 (megacore), v5e, v5p, v6e and the GPUs, one TensorCore on v3 (2 per chip) and one
chiplet on TPU7x (2 per chip), so per-chip figures are divided accordingly.

Sources (vendor spec pages, read 2026-11):
- TPU v3, v4, v5e, v5p, v6e, TPU7x: cloud.google.com/tpu/docs/{v3,v4,v5e,v5p,v6e,tpu7x}
  ("System architecture": peak BF16 TFLOPs per chip, HBM capacity and bandwidth per chip).
  v3 123 TFLOP/s, 32 GiB, 900 GB/s per chip; v4 275, 32 GiB, 1200 GB/s; v5e 197, 16 GiB,
  819 GB/s; v5p 459, 95 GiB, 2765 GB/s; v6e 918, 32 GiB, 1640 GB/s; TPU7x 2307, 192 GiB,
  7380 GB/s.
- NVIDIA A100 SXM 80GB (312 TFLOP/s dense bf16, 2039 GB/s), H100 SXM (989, 80 GB, 3350 GB/s),
  H100 PCIe (756, 80 GB, 2000 GB/s), H200 (989, 141 GB, 4800 GB/s): nvidia.com data sheets.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One JAX device's share of a chip."""

    name: str  # our short name: the topology prefix for TPUs ("v5e", "v5p", ...)
    kinds: tuple[str, ...]  # lower-case substrings of `device.device_kind` that identify it
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float  # HBM capacity
    hbm_bandwidth: float  # bytes/s


# The first match on device_kind wins, so specific names come before their prefixes
# ("TPU v5 lite" is v5e, "TPU v5" is v5p).
CHIPS: tuple[Chip, ...] = (
    Chip("v5e", ("v5 lite", "v5e"), 197e12, 16 * GiB, 819e9),
    Chip("v6e", ("v6 lite", "v6e"), 918e12, 32 * GiB, 1640e9),
    Chip("v5p", ("v5p", "tpu v5"), 459e12, 95 * GiB, 2765e9),
    Chip("v4", ("tpu v4",), 275e12, 32 * GiB, 1200e9),
    Chip("v3", ("tpu v3",), 123e12 / 2, 16 * GiB, 900e9 / 2),  # per TensorCore
    Chip("tpu7x", ("tpu7x",), 2307e12 / 2, 96 * GiB, 7380e9 / 2),  # per chiplet
    Chip("a100", ("a100",), 312e12, 80e9, 2039e9),
    Chip("h100 pcie", ("h100 pcie",), 756e12, 80e9, 2000e9),
    Chip("h100", ("h100",), 989e12, 80e9, 3350e9),  # SXM
    Chip("h200", ("h200",), 989e12, 141e9, 4800e9),
)


def chip_for(device_kind: str) -> Chip | None:
    """The Chip a `device_kind` string names, or None (CPU, unknown GPUs)."""
    kind = device_kind.lower()
    for chip in CHIPS:
        if any(k in kind for k in chip.kinds):
            return chip
    return None
