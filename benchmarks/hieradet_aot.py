"""SAM 2's image encoder (HieraDet trunk + FPN neck) at 1024 on a TPU slice, ahead of time.

Compiles the encoder's forward (bf16 compute, float32 params, batch split over a data-parallel
mesh, params replicated) with the real TPU compiler (libtpu, on this CPU; nothing runs) and
reports, per chip: peak HBM, XLA's bytes accessed and FLOPs of the compiled program, and the
roofline they give (images/s per chip at the bound). No loop hides work here: the blocks are
unrolled, so XLA's counts are the whole program's. Model FLOPs are counted on the same program
lowered for the CPU.

    python benchmarks/hieradet_aot.py                    # tiny, base_plus, large on v5e:2x2
    python benchmarks/hieradet_aot.py --variants sam2_hiera_tiny --per-chip 8 --write
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sections import write_section  # noqa: E402

from hiera_jax.models import hieradet, hieradet_neck  # noqa: E402
from hiera_jax.models.kernels import tpu  # noqa: E402
from hiera_jax.training.cost import aot, chips  # noqa: E402
from hiera_jax.training.cost import flops as flops_lib  # noqa: E402

SECTION = "hieradet-aot"  # of BENCHMARKS.md
VARIANTS = ("sam2_hiera_tiny", "sam2_hiera_base_plus", "sam2_hiera_large")


def measure(variant: str, size: int, per_chip: int, topology: str) -> dict:
    devices = aot.topology_devices(topology)
    kind = devices[0].device_kind
    chip = chips.chip_for(kind)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    trunk = hieradet.get_config(variant, input_size=(size, size), dtype="bfloat16")
    encoder = hieradet_neck.ImageEncoder(trunk, hieradet_neck.FpnNeckConfig())
    batch = per_chip * len(devices)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    params = jax.eval_shape(lambda k, x: encoder.init(k, x)["params"], jax.random.key(0), x)

    def forward(p, images):
        return encoder.apply({"params": p}, images)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    model_flops = flops_lib.count_flops(forward, params, x, platform="cpu")
    t0 = time.time()
    with jax.set_mesh(mesh), tpu.compiling_for(kind):  # the Pallas kernels run per device
        compiled = (
            jax.jit(forward, in_shardings=(replicated, data), out_shardings=data)
            .lower(params, x)
            .compile({"exec_time_optimization_effort": -1.0})
        )
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    device_bytes, device_flops = float(cost["bytes accessed"]), float(cost["flops"])
    compute_s = device_flops / chip.peak_bf16_flops
    memory_s = device_bytes / chip.hbm_bandwidth
    bound = max(compute_s, memory_s)
    return {
        "variant": variant,
        "size": size,
        "topology": topology,
        "per_chip": per_chip,
        "peak_gib": float(getattr(mem, "peak_memory_in_bytes", 0) or 0) / 2**30,
        "gb_per_image": device_bytes / per_chip / 1e9,
        "gflop_per_image": (model_flops or 0.0) / batch / 1e9,
        "compute_ms": compute_s * 1e3,
        "memory_ms": memory_s * 1e3,
        "images_per_s_per_chip": per_chip / bound,
        "mfu_ceiling": (model_flops or 0.0) / len(devices) / chip.peak_bf16_flops / bound,
        "compile_s": seconds,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| encoder | input | slice | batch/chip | peak HBM/chip | HBM traffic/image | "
        "GFLOP/image | compute / HBM floor (ms/step) | bound: images/s/chip | MFU ceiling |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['variant']} + FPN | {r['size']} | {r['topology']} | {r['per_chip']} | "
        f"{r['peak_gib']:.2f} GiB | {r['gb_per_image']:.3f} GB | {r['gflop_per_image']:.0f} | "
        f"{r['compute_ms']:.1f} / {r['memory_ms']:.1f} | {r['images_per_s_per_chip']:.0f} | "
        f"{100 * r['mfu_ceiling']:.0f}% |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--per-chip", type=int, default=4)
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        rows.append(measure(variant, args.size, args.per_chip, args.topology))
        print(rows[-1], flush=True)
    body = table(rows)
    print(body)
    if args.write:
        command = " ".join(["python benchmarks/hieradet_aot.py", *sys.argv[1:]])
        note = (
            f"`{command}` (libtpu 0.0.42, effort -1, bf16 compute, float32 params replicated, "
            "batch data-parallel; XLA's counts of the compiled forward, no loops):\n\n"
        )
        write_section(SECTION, note + body)


if __name__ == "__main__":
    main()
