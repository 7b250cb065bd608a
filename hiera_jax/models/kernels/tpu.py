"""What the Pallas kernels need to know about the TPU a program is compiled for, and how they
run under a mesh.

A program may be traced on one host for a TPU it never sees (the fit check's ahead-of-time
compile): `compiling_for` names the chip, and the kernels size their blocks to its VMEM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

# A kernel switch's values (HieraConfig.attention_kernel, .mlp_kernel): "auto" = the kernel in
# programs compiled for a TPU, XLA's ops elsewhere; "xla" = never; "pallas" = everywhere
# (interpreted off TPU: slow, for tests).
KERNELS = ("auto", "xla", "pallas")

# VMEM per TensorCore by device kind (Pallas' own table); a program traced without a TPU in
# sight and without `compiling_for` assumes the smallest (v4: 16 MiB).
_CHIPS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
    "TPU7x": "7x",
}
_MEGACORE = ("v4", "v5p")  # two TensorCores behind one device: a kernel's grid splits over both
_SMALLEST_VMEM = 16 * 2**20
_TARGET: list[str] = []


def check_kernel(kernel: str, field: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{field} must be one of {KERNELS}, got {kernel!r}")


@contextlib.contextmanager
def compiling_for(device_kind: str):
    """Trace for a TPU of `device_kind` (an ahead-of-time compile from another host): the
    kernels size themselves to its VMEM. It acts on tracing, so wrap the first `lower` of a
    jitted function: jit reuses a cached trace whatever the target."""
    _TARGET.append(device_kind)
    try:
        yield
    finally:
        _TARGET.pop()


def _chip() -> str | None:
    if _TARGET:
        return _CHIPS.get(_TARGET[-1])
    if jax.default_backend() == "tpu":
        return _CHIPS.get(jax.devices()[0].device_kind)
    return None


def vmem_capacity() -> int:
    """VMEM bytes per TensorCore of the TPU being traced for."""
    version = _chip()
    if version is None:
        return _SMALLEST_VMEM
    info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(version), 1)
    return int(info.vmem_capacity_bytes)


def vmem_limit() -> int:
    """The scoped VMEM a kernel asks for: 3/4 of the core's, the rest left to XLA."""
    return vmem_capacity() * 3 // 4


def tensor_cores() -> int:
    """TensorCores behind one device (2 on megacore chips): a grid axis marked "parallel" is
    split over them, so a kernel that accumulates over its grid keeps one partial sum each."""
    return 2 if _chip() in _MEGACORE else 1


def lanes(width: int) -> int:
    """`width` rounded up to whole 128-lane rows, as a TPU lays out a minor dimension."""
    return -(-width // 128) * 128


def dot(a: jnp.ndarray, b: jnp.ndarray, contract: tuple) -> jnp.ndarray:
    """A kernel's 2-D dot with f32 accumulation (float32 inputs at full precision)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def batch_spec() -> jax.sharding.PartitionSpec | None:
    """The batch split over every mesh axis (`hiera_jax.training.sharding`), or None without
    a mesh of several devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    return jax.sharding.PartitionSpec(tuple(mesh.axis_names))


def batch_per_device(batch: int) -> int:
    """The images each device's kernel sees of a global `batch` (`per_device`)."""
    spec = batch_spec()
    size = jax.sharding.get_abstract_mesh().size if spec is not None else 1
    return batch // size if batch % size == 0 else batch


def per_device(
    run: Callable, batched: tuple[jnp.ndarray, ...], shared: tuple[jnp.ndarray, ...] = ()
) -> tuple[tuple[jnp.ndarray, ...], tuple[jnp.ndarray, ...]]:
    """`run(*batched, *shared)` on each device's share of the batch: XLA cannot partition a
    custom call, so under a mesh a kernel runs inside `shard_map`, `batched` split over every
    mesh axis on their first dimension and `shared` (weights) whole on every device.

    `run` returns (outputs split like the batch, per-device partial sums such as weight
    gradients); the sums are added over the mesh. A batch the mesh does not divide runs unsplit.
    """
    spec = batch_spec()
    mesh = jax.sharding.get_abstract_mesh()
    if spec is None or batched[0].shape[0] % mesh.size:
        return run(*batched, *shared)

    def body(*args):
        split, summed = run(*args)
        return split, tuple(jax.lax.psum(a, spec[0]) for a in summed)

    whole = jax.sharding.PartitionSpec()
    in_specs = (spec,) * len(batched) + (whole,) * len(shared)
    # check_vma off: pallas_call declares its outputs without a varying-axes type.
    return jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=(spec, whole), check_vma=False
    )(*batched, *shared)
