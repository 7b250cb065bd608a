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
- NVIDIA A100 SXM 80GB (312 TFLOP/s dense bf16, 2039 GB/s), A100 40GB (312, 1555 GB/s), H100
  SXM (989, 80 GB, 3350 GB/s), H100 PCIe (756, 80 GB, 2000 GB/s), H200 (989, 141 GB, 4800 GB/s),
  B200 (HGX: 2250 dense, 180 GB, 8000 GB/s): nvidia.com data sheets. SM counts, clocks, L2 and
  shared memory for the GPU targets (`GpuTarget`): NVIDIA's architecture whitepapers and CUDA's
  compute-capability tables (A100: 108 SMs, 1.41 GHz, 40 MB L2, 164 KB shared memory per SM;
  H100/H200 SXM: 132, 1.98 GHz, 50 MB, 228 KB; B200: 148, 1.965 GHz, 126 MB, 228 KB).
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
    gpu: GpuTarget | None = None  # what XLA's GPU compiler needs to compile for it without one


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """An NVIDIA GPU as XLA's deviceless compiler sees it (`GpuTargetConfig`): enough to pick
    kernels, tile GEMMs and assign buffers for it on a host without that GPU."""

    description: str  # the device_kind JAX reports for it
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float
    l2_bytes: int
    memory_bytes: int  # what the driver reports (nvidia-smi's MiB x 2**20)
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int


_HOPPER_SMEM = dict(shared_memory_per_sm=233472, shared_memory_per_block_optin=232448)
_A100_SMEM = dict(shared_memory_per_sm=167936, shared_memory_per_block_optin=166912)
_A100_40 = GpuTarget(
    "NVIDIA A100-SXM4-40GB", (8, 0), 108, 1.41, 40 * 2**20, 40960 * 2**20, **_A100_SMEM
)
_A100_80 = GpuTarget(
    "NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 40 * 2**20, 81920 * 2**20, **_A100_SMEM
)
_H100 = GpuTarget(
    "NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 50 * 2**20, 84929347584, **_HOPPER_SMEM
)
_H200 = GpuTarget("NVIDIA H200", (9, 0), 132, 1.98, 50 * 2**20, 143771 * 2**20, **_HOPPER_SMEM)
_B200 = GpuTarget("NVIDIA B200", (10, 0), 148, 1.965, 126 * 2**20, 183359 * 2**20, **_HOPPER_SMEM)

# The first match on device_kind wins, so specific names come before their prefixes
# ("TPU v5 lite" is v5e, "TPU v5" is v5p).
CHIPS: tuple[Chip, ...] = (
    Chip("v5e", ("v5 lite", "v5e"), 197e12, 16 * GiB, 819e9),
    Chip("v6e", ("v6 lite", "v6e"), 918e12, 32 * GiB, 1640e9),
    Chip("v5p", ("v5p", "tpu v5"), 459e12, 95 * GiB, 2765e9),
    Chip("v4", ("tpu v4",), 275e12, 32 * GiB, 1200e9),
    Chip("v3", ("tpu v3",), 123e12 / 2, 16 * GiB, 900e9 / 2),  # per TensorCore
    Chip("tpu7x", ("tpu7x",), 2307e12 / 2, 96 * GiB, 7380e9 / 2),  # per chiplet
    Chip("a100-40gb", ("a100-sxm4-40gb", "a100-pcie-40gb"), 312e12, 40 * GiB, 1555e9, _A100_40),
    Chip("a100", ("a100",), 312e12, 80 * GiB, 2039e9, _A100_80),  # SXM 80GB
    Chip("h100 pcie", ("h100 pcie",), 756e12, 80e9, 2000e9),
    Chip("h100", ("h100",), 989e12, _H100.memory_bytes, 3350e9, _H100),  # SXM
    Chip("h200", ("h200",), 989e12, _H200.memory_bytes, 4800e9, _H200),
    Chip("b200", ("b200",), 2250e12, _B200.memory_bytes, 8000e9, _B200),
)


def chip_for(device_kind: str) -> Chip | None:
    """The Chip a `device_kind` string names, or None (CPU, unknown GPUs)."""
    kind = device_kind.lower()
    for chip in CHIPS:
        if any(k in kind for k in chip.kinds):
            return chip
    return None


def gpu_chips() -> dict[str, Chip]:
    """The GPUs a deviceless compile can target, by the name `--aot` takes (`h100:8`)."""
    return {c.name: c for c in CHIPS if c.gpu is not None}


def gpu_target_config(chip: Chip) -> str:
    """XLA's `GpuTargetConfig` text proto for `chip` (`jax.experimental.topologies`'s
    `target_config`); the format of XLA's own `*.txtpb` device descriptions. cuDNN 9.8 and
    CUDA 12.8 are what the target claims to run, as jax[cuda12] 0.10.2's wheels bring."""
    g = chip.gpu
    if g is None:
        raise ValueError(f"{chip.name} is not a GPU target")
    major, minor = g.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {g.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: {g.l2_bytes}
  clock_rate_ghz: {g.clock_ghz}
  device_memory_size: {g.memory_bytes}
  shared_memory_per_block_optin: {g.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 12
  minor: 8
  patch: 0
}}
device_description_str: "{g.description}"
"""
