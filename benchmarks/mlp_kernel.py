"""HBM bytes of one block's MLP half, x + mlp(norm2(x)), XLA's ops against the Pallas kernel.

A probe of HBM traffic: the kernel (`hiera_jax.models.kernels.fused_mlp`) against the same function as
XLA's ops (`mlp_kernel="xla"`), compiled forward + backward for one chip of a v5e 2x2 (libtpu on
this CPU, nothing runs), bf16, at Hiera-B's four stages; XLA's `bytes accessed` per image beside
this repository's HLO estimate (`hiera_jax/training/cost/hlo_cost.py`, kernels' operands at their
padded size). "auto" is what a TPU program takes: below as many token rows per chip as the
width, XLA's ops (`fused_mlp.kernel_fits`); "forced" runs the kernel there too, to show why.

    python benchmarks/mlp_kernel.py                       # the four Hiera-B stages, batch 16
    python benchmarks/mlp_kernel.py --stage 64 196 512    # batch, tokens, width (H = 4 x width)
    python benchmarks/mlp_kernel.py --write               # also update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402
from sections import write_section  # noqa: E402

from hiera_jax.models.kernels import fused_mlp, tpu  # noqa: E402
from hiera_jax.training.cost import aot, hlo_cost  # noqa: E402

SECTION = "mlp-kernel"  # of BENCHMARKS.md
# Hiera-B at 224, 16 images per chip: (batch, tokens, width) of each stage's blocks.
STAGES = [(16, 3136, 96), (16, 784, 192), (16, 196, 384), (16, 49, 768)]
# Fewer images per chip: where the kernel stops paying (rows = batch x tokens against width).
SMALL = [(8, 49, 768), (2, 196, 384)]
KERNELS = ("xla", "auto", "forced")


def measure(stage: tuple[int, int, int], device) -> dict[str, tuple[float, float]]:
    """{kernel: (XLA's MB per image, estimate MB per image)} of forward + backward."""
    batch, tokens, dim = stage
    bf = jnp.bfloat16
    x = jax.ShapeDtypeStruct((batch, tokens, dim), bf)
    vec = jax.ShapeDtypeStruct((dim,), jnp.float32)
    params = fused_mlp.MlpHalf(
        vec,
        vec,
        jax.ShapeDtypeStruct((dim, 4 * dim), bf),
        jax.ShapeDtypeStruct((4 * dim,), bf),
        jax.ShapeDtypeStruct((4 * dim, dim), bf),
        jax.ShapeDtypeStruct((dim,), bf),
    )
    sharding = SingleDeviceSharding(device)
    out = {}
    for kernel in KERNELS:

        def loss(x, p, kernel=kernel):
            if kernel == "forced":  # the kernel itself, past the check of whether it pays
                y = fused_mlp._fused(x, jnp.ones((batch, 1, 1), jnp.float32), p, 1e-6, False)
            else:
                y = fused_mlp.mlp_half(x, p, 1e-6, kernel=kernel)
            return (y.astype(jnp.float32) ** 2).sum()

        step = jax.jit(
            jax.grad(loss, argnums=(0, 1)),
            in_shardings=(sharding, jax.tree.map(lambda _: sharding, params)),
        )
        with tpu.compiling_for(device.device_kind):
            compiled = step.lower(x, params).compile({"exec_time_optimization_effort": -1.0})
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        estimate = hlo_cost.bytes_accessed(compiled.as_text())
        out[kernel] = (cost["bytes accessed"] / batch / 1e6, estimate / batch / 1e6)
    return out


def table(stages) -> str:
    device = aot.topology_devices("v5e:2x2")[0]
    lines = [
        "| (batch, tokens, width) | XLA's ops: MB / image | auto (TPU default) | kernel forced |",
        "| --- | ---: | ---: | ---: |",
    ]
    for stage in stages:
        r = measure(tuple(stage), device)
        cells = [f"{r[k][0]:.1f} ({r[k][1]:.1f})" for k in KERNELS]
        lines.append(f"| {tuple(stage)} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, nargs=3, action="append", help="batch tokens width")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    body = table(args.stage or STAGES + SMALL)
    if args.write:
        note = (
            "Made by `python benchmarks/mlp_kernel.py --write`: forward + backward of one MLP "
            "half, bf16, one v5e chip, compiler effort -1; XLA's count (this repository's "
            "estimate in brackets), MB per image.\n\n"
        )
        write_section(SECTION, note + body)


if __name__ == "__main__":
    main()
