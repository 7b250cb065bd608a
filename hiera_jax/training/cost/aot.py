"""Will this run fit a TPU slice or a GPU cluster? Compile its train step for it here, ahead of time.

`jax.experimental.topologies` gives compile-only devices of a TPU slice (libtpu, the `tpu` extra,
is the real TPU compiler and runs on the CPU) or of NVIDIA GPUs (the `gpu` extra's CUDA plugin:
XLA's GPU compiler, given a target description from `chips.gpu_target_config`, needs no GPU and
no driver). `fit_check` builds exactly what `train_and_evaluate`
builds on that slice (`setup.build_setup`: mesh shape rule, FSDP state shardings, the donated
train step, batch sharding, gradient accumulation, remat, dtype), lowers and compiles it, and
reports per-device memory, FLOPs, a roofline bound on step time and the collectives. Nothing is
run: no data is read, no checkpoint written, no TPU touched.

    python train.py --config configs/in1k_mae.py:base --workdir runs/aot --aot v5e:8x8
    python train.py --config configs/in1k_mae.py:base --workdir runs/aot --aot h100:8

A GPU target is `CHIP:N` (N GPUs on one host) or `CHIP:HxN` (H hosts of N). Without a GPU the
compiler cannot autotune: GEMMs take cuBLAS (XLA's Triton GEMM fusion, chosen by autotuning on a
device, is switched off as NVIDIA's JAX containers switch it off), so the program is close to, not
the same as, the one a GPU compiles. JAX on a GPU takes XLA_PYTHON_CLIENT_MEM_FRACTION (default
0.75) of the memory for its pool: a step fits if its peak fits in that share.

What the figures are: the compiler's own buffer assignment (peak HBM per device, arguments,
temporaries, code) and its FLOP and byte counts. What they are not: a measured step. The roofline
bound ignores collectives and overlap, so the MFU ceiling is an upper bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from hiera_jax.models.kernels import tpu
from hiera_jax.models.scan import auto_scan, use_scan
from hiera_jax.training import sharding
from hiera_jax.training.config import model_family
from hiera_jax.training.cost import chips, hlo_cost
from hiera_jax.training.cost import flops as flops_lib
from hiera_jax.training.setup import build_setup, unsharded

TOPOLOGY_RE = re.compile(r"^(?P<kind>[a-z0-9]+):\d+x\d+(x\d+)?$")
GPU_TOPOLOGY_RE = re.compile(r"^(?P<kind>[a-z0-9-]+):(?:(?P<hosts>\d+)x)?(?P<gpus>\d+)$")
# What a deviceless GPU compile changes from XLA's defaults (see the module docstring).
GPU_COMPILE_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
DEFAULT_GPU_MEM_FRACTION = 0.75  # JAX's preallocated share of a GPU's memory
# The schedule's length only changes constants in the step, not its memory or FLOPs.
NOMINAL_STEPS_PER_EPOCH = 1000
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
EFFORT_HELP = (
    "XLA's exec_time_optimization_effort in [-1, 1]: -1 (default here) compiles a Hiera base MAE "
    "step about 13x faster than 0 (the compiler's default, what a real run uses) and moves the "
    "memory figures by 1-2%; use 0 to see the exact program a run gets."
)


class DoesNotFit(Exception):
    """The step needs more HBM than a device has; `reason` is one line, `advice` the fixes."""

    def __init__(self, reason: str, advice: list[str], report: dict[str, Any]):
        super().__init__(reason)
        self.reason, self.advice, self.report = reason, advice, report


def is_gpu_topology(topology: str) -> bool:
    """Whether `topology` names GPUs (`h100:8`, `a100-40gb:2x8`) rather than a TPU slice."""
    match = GPU_TOPOLOGY_RE.match(topology or "")
    return bool(match) and match["kind"] in chips.gpu_chips()


def gpu_devices(topology: str, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of `CHIP:N` (N GPUs on a host) or `CHIP:HxN` (H hosts), no GPU."""
    match = GPU_TOPOLOGY_RE.match(topology)
    if num_slices != 1:
        raise ValueError(
            f"--aot_slices is for TPU slices; give GPU hosts in the name: {match['kind']}:"
            f"{num_slices}x{match['gpus']} ({num_slices} hosts of {match['gpus']} GPUs)"
        )
    hosts, gpus = int(match["hosts"] or 1), int(match["gpus"])
    if hosts < 1 or gpus < 1:
        raise ValueError(f"--aot {topology!r}: hosts and GPUs per host must be >= 1")
    import importlib.util

    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise RuntimeError(
            "the GPU compiler (jax's CUDA plugin) is not installed: pip install -e '.[gpu]'"
        )
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver here to check
    from jax.experimental import topologies

    chip = chips.gpu_chips()[match["kind"]]
    topo = topologies.get_topology_desc(
        platform="cuda",
        target_config=chips.gpu_target_config(chip),
        topology=f"1x{hosts}x{gpus}",
    )
    return list(topo.devices)


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of a TPU slice named `TYPE:AxB[xC]` (v5e:4x4, v5p:2x2x2, v4:2x2x1)
    or of GPUs named `CHIP:N` / `CHIP:HxN` (h100:8, h200:4x8; `chips.gpu_chips()`)."""
    if is_gpu_topology(topology):
        return gpu_devices(topology, num_slices)
    match = TOPOLOGY_RE.match(topology or "")
    if not match:
        raise ValueError(
            f"--aot {topology!r} is not a topology name: use TYPE:AxB or TYPE:AxBxC in chips "
            "for a TPU slice, e.g. v5e:8x8 (a v5e-64), v5p:4x4x2, v4:4x4x2, v6e:4x4, or "
            f"CHIP:N / CHIP:HxN for N GPUs on each of H hosts, CHIP one of "
            f"{', '.join(chips.gpu_chips())}, e.g. h100:8, h200:4x8"
        )
    if num_slices < 1:
        raise ValueError(f"--aot_slices must be >= 1, got {num_slices}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a second process may hold libtpu
    # libtpu looks for a Cloud TPU VM's metadata; say there is none (quiet start-up warnings).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {}
    if match["kind"] == "v4":
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as on a v4 TPU VM
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        with _quiet_stderr():  # libtpu's start-up lines about a TPU VM we are not on
            topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - turned into one line
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise RuntimeError(
                "the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]'"
            ) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"libtpu does not know the topology {topology!r}: {first}") from e
    return list(topo.devices)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++ writes to stderr (file descriptor 2) inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _hlo_collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """Count the collectives in compiled HLO text, with the bytes of their results (summed over
    a combined collective's tuple; an async `-start` op's result is its last tuple element)."""
    counts: Counter = Counter()
    nbytes: Counter = Counter()
    pattern = re.compile(
        r"^\s*%?\S+\s*=\s*(?P<shape>.*?)\s(?P<op>"
        + "|".join(COLLECTIVES)
        + r")(?P<start>-start)?\("
    )
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        counts[m["op"]] += 1
        arrays = re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m["shape"])
        if m["start"]:
            arrays = arrays[-1:]
        for dtype, dims in arrays:
            size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            nbytes[m["op"]] += hlo_cost.DTYPE_BYTES.get(dtype, 4) * size
    return {op: {"count": counts[op], "bytes": float(nbytes[op])} for op in sorted(counts)}


def _state_bytes_per_device(abstract_state: Any, state_sh: Any) -> float:
    """Bytes of params + optimizer state one device holds under the FSDP shardings."""
    total = 0.0
    for leaf, sh in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(state_sh)):
        shard = sh.shard_shape(leaf.shape)
        total += np.prod(shard, dtype=np.float64) * np.dtype(leaf.dtype).itemsize
    return total


def _parse_oom(message: str) -> tuple[str, float | None, float | None]:
    """(one line, needed bytes, available bytes) from a RESOURCE_EXHAUSTED compile error."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    m = re.search(r"\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM\s*\(([\d.]+)([KMGT]?)\)", message)
    line = next((ln.strip() for ln in message.splitlines() if "memory" in ln.lower()), "")
    line = re.sub(r"^.*RESOURCE_EXHAUSTED:\s*", "", line or message.strip().splitlines()[0])
    if not m:
        return line, None, None
    need = float(m[1]) * units[m[2]]
    have = float(m[3]) * units[m[4]]
    return line, need, have


def _advice(config: ml_collections.ConfigDict, mesh, per_device_batch: int) -> list[str]:
    """What to try when a step does not fit, most effective first."""
    tips = []
    if not config.model.get("remat", False):
        tips.append("--config.model.remat=True (recompute activations in the backward pass)")
    if mesh.shape["fsdp"] < mesh.size:
        bigger = min(mesh.size, max(2, mesh.shape["fsdp"] * 4))
        tips.append(
            f"a larger fsdp axis: --config.mesh_shape='(-1,{bigger})' (parameters and optimizer "
            f"state split {bigger} ways instead of {mesh.shape['fsdp']})"
        )
    accum = int(config.grad_accum_steps)
    if per_device_batch // accum >= 2:
        tips.append(
            f"--config.grad_accum_steps={accum * 2} (the same update from microbatches of "
            f"{per_device_batch // (accum * 2)} examples per device)"
        )
    tips.append(
        f"a smaller per-device batch (now {per_device_batch}): a larger slice, or a smaller "
        "--config.batch_size (the learning rate scales with it)"
    )
    if str(config.model.get("dtype", "float32")) == "float32":
        tips.append("--config.model.dtype=bfloat16 (half the activation memory)")
    return tips


def fit_check(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    num_slices: int = 1,
    effort: float | None = -1.0,
    config_name: str = "",
    on_compiled: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Compile `config`'s train step for `topology` and report; DoesNotFit if it cannot fit.

    `on_compiled(compiled)` sees the compiled step (benchmarks/hbm_traffic.py reads its HLO).
    """
    devices = topology_devices(topology, num_slices)
    kind = devices[0].device_kind
    chip = chips.chip_for(kind)
    gpu = is_gpu_topology(topology)
    platform = "gpu" if gpu else "tpu"
    mesh = sharding.create_mesh(config.mesh_shape, devices)
    if config.model.get("scan_blocks") is None and model_family(config).scannable:
        # Automatic means what the target picks, whatever backend this host traces with.
        config = config.copy_and_resolve_references()
        config.model.scan_blocks = auto_scan(platform)
    setup = build_setup(config, mesh, NOMINAL_STEPS_PER_EPOCH * int(config.batch_size))
    model_config = setup.model_config
    per_device_batch = config.batch_size // mesh.size
    report: dict[str, Any] = {
        "topology": topology,
        "num_slices": num_slices,
        "devices": mesh.size,
        "device_kind": kind,
        "config": config_name,
        "model": config.model.get("name") or "custom",
        "task": setup.task,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch_size": int(config.batch_size),
        "per_device_batch": per_device_batch,
        "grad_accum_steps": setup.accum_steps,
        "remat": bool(model_config.remat),
        "scan_blocks": use_scan(model_config),
        "dtype": str(model_config.dtype),
        "compiler_effort": effort,
        "hbm_per_device_bytes": chip.hbm_bytes if chip else None,
        # On a GPU, JAX's memory pool is this share of it (XLA_PYTHON_CLIENT_MEM_FRACTION).
        "usable_hbm_fraction": gpu_mem_fraction() if gpu else 1.0,
        "state_bytes_per_device": _state_bytes_per_device(setup.abstract_state, setup.state_sh),
    }
    train_args = setup.abstract_train_args()
    # Model FLOPs: the plain step (no remat, no accumulation) lowered for the CPU, global.
    model_flops = flops_lib.count_flops(
        setup.plain_step_fn(), *unsharded(train_args), platform="cpu"
    )
    report["flops"] = {
        "model_per_step": model_flops,
        "model_per_example": model_flops / config.batch_size if model_flops else None,
    }
    options = {} if effort is None else {"exec_time_optimization_effort": float(effort)}
    if gpu:
        options.update(GPU_COMPILE_OPTIONS)
        report["compiler_options"] = dict(GPU_COMPILE_OPTIONS)
    t0 = time.time()
    # The Pallas kernels size their VMEM to the chip compiled for (hiera_jax.models.kernels.tpu).
    with jax.set_mesh(mesh), tpu.compiling_for(kind):
        lowered = setup.jit_train_step().lower(*train_args)
        try:
            compiled = lowered.compile(options or None)
        except Exception as e:  # noqa: BLE001 - only an out-of-memory is a verdict
            # The GPU compiler sets no HBM limit (the verdict on its peak is below): its errors,
            # a kernel's shared memory included, are errors, not "does not fit".
            oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
            if gpu or not oom:
                raise
            line, need, have = _parse_oom(str(e))
            report.update(fits=False, compile_seconds=time.time() - t0, error=line)
            report["memory"] = {"needed": need, "available": have}
            if need and have:
                reason = (
                    f"the step needs {need / 2**30:.2f} GiB of HBM per device, "
                    f"{kind} has {have / 2**30:.2f} GiB available ({topology}, batch "
                    f"{config.batch_size}, {per_device_batch} per device)"
                )
            else:
                reason = f"on {topology}: {line}"
            raise DoesNotFit(reason, _advice(config, mesh, per_device_batch), report) from None
    report["compile_seconds"] = time.time() - t0
    if on_compiled is not None:
        on_compiled(compiled)

    mem = compiled.memory_analysis()
    memory = {
        "arguments": float(mem.argument_size_in_bytes),
        "outputs": float(mem.output_size_in_bytes),
        "aliased": float(mem.alias_size_in_bytes),
        "temporaries": float(mem.temp_size_in_bytes),
        "generated_code": float(mem.generated_code_size_in_bytes),
        "peak": float(getattr(mem, "peak_memory_in_bytes", 0))
        or float(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        ),
    }
    report["memory"] = memory
    hbm = report["hbm_per_device_bytes"]
    usable = hbm * report["usable_hbm_fraction"] if hbm else None
    report["headroom_bytes"] = usable - memory["peak"] if usable else None
    # A TPU compile fails when a buffer does not fit (above); the GPU compiler assigns buffers
    # without a limit, so the verdict is the peak against JAX's pool.
    report["fits"] = usable is None or memory["peak"] <= usable
    if not report["fits"]:
        reason = (
            f"the step needs {memory['peak'] / 2**30:.2f} GiB per GPU, JAX's pool on a {kind} "
            f"is {usable / 2**30:.2f} GiB ({report['usable_hbm_fraction']:.0%} of "
            f"{hbm / 2**30:.1f} GiB; {topology}, batch {config.batch_size}, {per_device_batch} "
            "per device)"
        )
        memory.update(needed=memory["peak"], available=usable)
        advice = _advice(config, mesh, per_device_batch)
        if report["usable_hbm_fraction"] < 0.95 and memory["peak"] <= 0.95 * hbm:
            advice.insert(0, "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (a larger share for JAX's pool)")
        raise DoesNotFit(reason, advice, report)

    cost = flops_lib.cost_dict(compiled)
    # The compiled program's own count, as `flops.compiled_flops` (the MFU count's last
    # fallback) makes it global.
    compiled_total = flops_lib.global_flops(cost, mesh.size) or 0.0
    device_flops = compiled_total / mesh.size
    hlo_text = compiled.as_text() or ""
    looped = use_scan(model_config) or setup.accum_steps > 1
    if "bytes accessed" in cost:
        xla_bytes = float(cost["bytes accessed"])
        device_bytes = looped_bytes(hlo_text, xla_bytes) if looped else xla_bytes
    else:  # XLA's GPU compiler gives no cost analysis: our count of its optimized HLO
        module = hlo_cost.parse(hlo_text)
        xla_bytes = hlo_cost.bytes_accessed(module, loops=False)
        device_bytes = hlo_cost.bytes_accessed(module)
        report["bytes_source"] = "hiera_jax.training.cost.hlo_cost over the optimized HLO"
    if not compiled_total and model_flops:  # no compiled count (GPU): the model's, per device
        device_flops = model_flops / mesh.size
        if model_config.remat and not (use_scan(model_config) or setup.accum_steps > 1):
            # What remat computes again: the same step lowered for the CPU counts it.
            executed = flops_lib.count_flops(
                setup.unlooped_step_fn(), *unsharded(train_args), platform="cpu"
            )
            if executed:
                report["flops"]["executed_per_step"] = executed
                device_flops = max(device_flops, executed / mesh.size)
    # With remat's recompute and the kernels'.
    report["flops"]["compiled_per_step"] = compiled_total
    # The Pallas kernels' backwards recompute (fc1, attention logits): the compiled count has
    # it, the CPU counts below do not (the CPU takes XLA's branch of their platform switch).
    with jax.set_mesh(mesh), tpu.compiling_for(kind):
        recompute = flops_lib.kernel_recompute_flops(
            setup.unlooped_step_fn(), *train_args, platform="cuda" if gpu else "tpu"
        )
    report["flops"]["kernel_recompute_per_step"] = recompute
    if not compiled_total and recompute:
        # No compiled count (GPU): the kernels compute this on top of the model's FLOPs (or
        # remat's executed ones), so the step's compute bound counts it too.
        device_flops += recompute / mesh.size
    report["flops"]["bytes_accessed_per_device"] = device_bytes
    report["flops"]["xla_bytes_accessed_per_device"] = xla_bytes  # loop bodies counted once
    if chip:
        # XLA counts a loop body once: with scanned blocks or accumulated microbatches the
        # compiled FLOP count misses the repeats, so compute takes at least the model FLOPs;
        # the bytes are XLA's count scaled by the loops' trip counts (`looped_bytes`).
        if looped:
            # The same step with its loops opened, lowered for the CPU: with remat, its count
            # has the recompute that model FLOPs leave out and the looped program hides.
            # Without remat it is the plain step model FLOPs were counted on: not lowered twice.
            executed = (
                flops_lib.count_flops(
                    setup.unlooped_step_fn(), *unsharded(train_args), platform="cpu"
                )
                if model_config.remat
                else model_flops
            )
            if executed:
                executed += recompute
            report["flops"]["executed_per_step"] = executed
            report["roofline_note"] = (
                "loops (scanned blocks or grad_accum_steps) are counted once by XLA: compute "
                "uses the FLOPs of the same step unlooped (remat's and the TPU kernels' "
                "recompute included) where "
                "they exceed the compiled count; HBM traffic is XLA's count with each loop "
                "body scaled by its trip count, read from the optimized HLO"
            )
            device_flops = max(device_flops, (executed or model_flops or 0.0) / mesh.size)
        compute_s = device_flops / chip.peak_bf16_flops
        memory_s = device_bytes / chip.hbm_bandwidth
        bound = max(compute_s, memory_s)
        report["roofline"] = {
            "peak_bf16_flops_per_device": chip.peak_bf16_flops,
            "hbm_bandwidth_per_device": chip.hbm_bandwidth,
            "compute_seconds": compute_s,
            "memory_seconds": memory_s,
            "step_lower_bound_seconds": bound,
            "bound_by": "compute" if compute_s >= memory_s else "memory",
            "mfu_ceiling": (
                model_flops / mesh.size / chip.peak_bf16_flops / bound
                if model_flops and bound > 0
                else None
            ),
        }
    report["collectives"] = _hlo_collectives(hlo_text)
    return report


def gpu_mem_fraction() -> float:
    """JAX's share of a GPU's memory for its pool: XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.75;
    all of it where preallocation is off (XLA_PYTHON_CLIENT_PREALLOCATE=false)."""
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
        return 1.0
    try:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))
    except ValueError:
        return DEFAULT_GPU_MEM_FRACTION


def looped_bytes(hlo_text: str, xla_bytes: float) -> float:
    """XLA's bytes accessed with every loop body counted as often as it runs.

    XLA counts a while body once. The optimized HLO, read by `hlo_cost`, gives each top-level
    instruction's traffic with and without the trip counts; their ratio scales XLA's own count
    (so a program without loops keeps XLA's figure exactly, and the estimate's own bias, a few
    percent against XLA on unscanned steps, cancels out of the ratio).
    """
    module = hlo_cost.parse(hlo_text)  # tens of MB of text for a large step: parsed once
    once = hlo_cost.bytes_accessed(module, loops=False)
    full = hlo_cost.bytes_accessed(module)
    return xla_bytes * full / once if once > 0 else xla_bytes


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def _gib(x: float | None) -> str:
    return "?" if x is None else f"{x / 2**30:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """The report as a few lines for a person."""
    mem, fl = r["memory"], r["flops"]
    slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
    lines = [
        f"AOT fit check: {r['config'] or r['model']} ({r['task']}) on {r['topology']}{slices}: "
        f"{r['devices']} x {r['device_kind']}, mesh {r['mesh']}, batch {r['batch_size']} "
        f"({r['per_device_batch']}/device, grad_accum_steps {r['grad_accum_steps']}), "
        f"remat {r['remat']}, scan_blocks {r.get('scan_blocks')}, {r['dtype']}; "
        f"compiled in {r['compile_seconds']:.0f} s (effort {r['compiler_effort']}"
        + "".join(f", {k}={v}" for k, v in r.get("compiler_options", {}).items())
        + ")",
        f"  HBM per device: {_gib(r['hbm_per_device_bytes'])}"
        + (
            f" (JAX's pool: {r['usable_hbm_fraction']:.0%}, XLA_PYTHON_CLIENT_MEM_FRACTION)"
            if r.get("usable_hbm_fraction", 1.0) < 1.0
            else ""
        )
        + f"; peak {_gib(mem['peak'])} "
        f"(headroom {_gib(r['headroom_bytes'])}) = arguments {_gib(mem['arguments'])} "
        f"(params + optimizer state {_gib(r['state_bytes_per_device'])}) + temporaries "
        f"{_gib(mem['temporaries'])} + outputs not aliased "
        f"{_gib(mem['outputs'] - mem['aliased'])}; generated code {mem['generated_code'] / 2**20:.1f} MiB",
    ]
    if fl.get("model_per_step"):
        model = (
            f"  FLOPs: model {fl['model_per_step'] / 1e12:.3g} TFLOP/step "
            f"({fl['model_per_example'] / 1e9:.3g} GFLOP/example); "
        )
        if not fl.get("compiled_per_step"):
            executed = fl.get("executed_per_step")
            again = fl.get("kernel_recompute_per_step")
            lines.append(
                model
                + "the compiler gives no count of its own (GPU)"
                + (f"; {executed / 1e12:.3g} TFLOP/step with remat's recompute" if executed else "")
                + (f"; the kernels compute {again / 1e12:.3g} TFLOP/step again" if again else "")
            )
        elif fl.get("executed_per_step"):
            lines.append(
                model + f"executed {fl['executed_per_step'] / 1e12:.3g} TFLOP/step (the step "
                "with its loops opened, remat's and the kernels' recompute included); the "
                "compiled program counts "
                f"{fl['compiled_per_step'] / 1e12:.3g} (each loop body once)"
            )
        else:
            lines.append(
                model
                + f"as compiled {fl['compiled_per_step'] / 1e12:.3g} TFLOP/step (with remat's "
                "and the kernels' recompute and the work every device repeats)"
            )
    roof = r.get("roofline")
    if roof:
        mfu = roof["mfu_ceiling"]
        lines.append(
            f"  Roofline: step >= {_ms(roof['step_lower_bound_seconds'])} "
            f"({roof['bound_by']}-bound: compute {_ms(roof['compute_seconds'])} at "
            f"{roof['peak_bf16_flops_per_device'] / 1e12:.0f} TFLOP/s, HBM traffic "
            f"{_ms(roof['memory_seconds'])} at {roof['hbm_bandwidth_per_device'] / 1e9:.0f} GB/s);"
            f" MFU ceiling {_pct(mfu)} (collectives not counted)"
        )
        per_example = fl["bytes_accessed_per_device"] * r["devices"] / r["batch_size"]
        traffic = (
            f"  HBM traffic: {fl['bytes_accessed_per_device'] / 1e9:.3g} GB per device per step "
            f"({per_example / 1e9:.3g} GB per example)"
        )
        if r.get("bytes_source"):
            traffic += f", counted by {r['bytes_source']}, every loop trip counted"
        elif r.get("roofline_note"):
            traffic += (
                f", every loop trip counted (XLA's own count, each loop body once: "
                f"{fl['xla_bytes_accessed_per_device'] / 1e9:.3g} GB)"
            )
        lines.append(traffic)
    coll = r["collectives"]
    if coll:
        lines.append(
            "  Collectives: "
            + ", ".join(
                f"{op} x{v['count']} ({v['bytes'] / 2**20:.0f} MiB)" for op, v in coll.items()
            )
        )
    else:
        lines.append("  Collectives: none")
    return "\n".join(lines)


def summary_line(r: dict[str, Any]) -> str:
    roof = r.get("roofline") or {}
    mfu = roof.get("mfu_ceiling")
    return (
        f"FITS: {r['config'] or r['model']} on {r['topology']}"
        + (f" x{r['num_slices']}" if r["num_slices"] > 1 else "")
        + f": peak {_gib(r['memory']['peak'])} of {_gib(r['hbm_per_device_bytes'])} per device"
        + (f", step >= {_ms(roof['step_lower_bound_seconds'])}" if roof else "")
        + (f", MFU <= {_pct(mfu)}" if mfu else "")
    )


def report_path(workdir: str, topology: str, num_slices: int = 1) -> str:
    suffix = f"_{num_slices}slices" if num_slices > 1 else ""
    return os.path.join(workdir, f"aot_{topology}{suffix}.json")


def write_report(report: dict[str, Any], workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    path = report_path(workdir, report["topology"], report["num_slices"])
    with open(path, "w") as f:
        json.dump(
            dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report, f, indent=2
        )
    return path
