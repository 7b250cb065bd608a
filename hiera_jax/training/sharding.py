"""One device mesh `("data", "fsdp")`, a shape-based FSDP rule for parameters, batch shardings.

Parameters and optimizer state are sharded over `fsdp` by one rule applied to every leaf's
shape: the largest dimension divisible by the `fsdp` size is split, everything else (and any
leaf smaller than `min_size` elements) is replicated. The model code carries no annotations, so
the same modules serve inference and training; the batch is split over both axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every device


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int]:
    """Fill one -1 entry so the mesh covers `num_devices`; ValueError if it cannot."""
    shape = [int(s) for s in shape]
    if len(shape) != len(AXES):
        raise ValueError(f"mesh_shape must have {len(AXES)} entries {AXES}, got {tuple(shape)}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape {tuple(shape)} may hold one -1 and positive sizes only")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh_shape {tuple(shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh_shape {tuple(shape)} has {math.prod(shape)} devices but {num_devices} are "
            "used; set --config.mesh_shape to sizes whose product is the device count, or -1"
        )
    return tuple(shape)


def create_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A `("data", "fsdp")` mesh with Auto axis types: linen's modules and `with_sharding_constraint`
    work with them as they are, where Explicit axes would need every op's sharding spelled out."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:  # multi-slice TPU: data parallel over the slow links between slices
        return Mesh(
            multi_slice_grid(shape, devices, num_slices),
            AXES,
            axis_types=(AxisType.Auto,) * len(AXES),
        )
    try:  # physical-topology-aware order on TPU/GPU; plain order elsewhere
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - CPU subsets and odd topologies
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def multi_slice_grid(shape: tuple[int, int], devices: Sequence[Any], num_slices: int) -> np.ndarray:
    """Devices of several slices as a (data, fsdp) grid: `data` spans the slices (DCN), `fsdp`
    stays inside one slice (ICI), where its all-gathers are fast."""
    from jax.experimental import mesh_utils

    data, fsdp = shape
    if data % num_slices:
        raise ValueError(
            f"mesh_shape {shape} on {num_slices} slices: the data axis ({data}) must be a multiple "
            f"of the slice count (fsdp stays inside a slice of {len(devices) // num_slices} devices)"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp), (num_slices, 1), devices
    )


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 0) -> P:
    """Split the largest dimension divisible by `fsdp_size`; replicate small or indivisible leaves."""
    if fsdp_size <= 1 or not shape or math.prod(shape) < max(min_size, 1):
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 0) -> Any:
    """NamedShardings for every leaf of a (params, optimizer state, ...) tree by the FSDP rule."""
    fsdp = mesh.shape["fsdp"]

    def rule(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, fsdp_spec(shape, fsdp, min_size))

    return jax.tree.map(rule, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every device, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
