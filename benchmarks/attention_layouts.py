"""HBM bytes of one attention layer in five formulations, compiled alone for one TPU v5e chip.

A probe of HBM traffic: which layout of mask-unit attention moves fewest bytes. Each formulation
computes the same function (qkv projection, softmax attention per window, output projection)
in bf16; it is compiled forward only and forward + backward for one chip of a v5e 2x2 (libtpu
on this CPU, nothing runs), and XLA's `bytes accessed` is reported per image beside this
repository's HLO estimate (`hiera_jax/training/cost/hlo_cost.py`).

- `current`: as `MaskUnitAttention` writes it (reshape to `[B, n, w, 3, h, d]`, one transpose
  to `[3, B, w, h, n, d]`, and back).
- `einsum_layout`: qkv and output projections as einsums straight into and out of the
  `[B, w, h, n, d]` layout.
- `dot_product_attention`: `jax.nn.dot_product_attention` (its XLA path) on `[B·w, n, h, d]`.
- `window_kernel`: `current`'s layout around the Pallas window kernel
  (`hiera_jax.models.attention.window_attention`).
- `token_kernel`: the Pallas kernel straight from the projection's `[B, N, 3·C]`, as the model
  runs on TPU (`hiera_jax.models.attention.attention`).

    python benchmarks/attention_layouts.py                  # the four Hiera-B stages
    python benchmarks/attention_layouts.py --stage 16 64 49 96 1   # batch, n, windows, dim, heads
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from hiera_jax.models import attention  # noqa: E402
from hiera_jax.training.cost import aot, hlo_cost  # noqa: E402

# Hiera-B at 224, batch 16: (batch, tokens per window, windows, width, heads) of a block in
# each stage after its first (no query pooling).
STAGES = [(16, 64, 49, 96, 1), (16, 16, 49, 192, 2), (16, 196, 1, 384, 4), (16, 49, 1, 768, 8)]


def formulations(B: int, n: int, w: int, C: int, H: int) -> dict:
    d = C // H
    bf = jnp.bfloat16

    def softmax_attention(q, k, v):
        logits = jnp.einsum("bwhqd,bwhkd->bwhqk", q * d**-0.5, k).astype(jnp.float32)
        p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        out = jnp.einsum("bwhqk,bwhkd->bwhqd", p.astype(v.dtype), v)
        return out / p.sum(-1, keepdims=True).astype(bf)

    def current(x, W, b, Wp, bp):
        qkv = (x @ W + b).reshape(B, n, w, 3, H, d)
        q, k, v = qkv.transpose(3, 0, 2, 4, 1, 5)
        o = softmax_attention(q, k, v).transpose(0, 3, 1, 2, 4).reshape(B, n * w, C)
        return o @ Wp + bp

    def einsum_layout(x, W, b, Wp, bp):
        x4 = x.reshape(B, n, w, C)
        qkv = jnp.einsum("bnwc,cthd->tbwhnd", x4, W.reshape(C, 3, H, d))
        qkv = qkv + b.reshape(3, 1, 1, H, 1, d)
        o = softmax_attention(qkv[0], qkv[1], qkv[2])
        out = jnp.einsum("bwhqd,hdc->bqwc", o, Wp.reshape(H, d, C)) + bp
        return out.reshape(B, n * w, C)

    def dot_product_attention(x, W, b, Wp, bp):
        qkv = (x @ W + b).reshape(B, n, w, 3, H, d)
        qkv = qkv.transpose(3, 0, 2, 1, 4, 5).reshape(3, B * w, n, H, d)
        o = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2])
        o = o.reshape(B, w, n, C).transpose(0, 2, 1, 3).reshape(B, n * w, C)
        return o @ Wp + bp

    def window_kernel(x, W, b, Wp, bp):
        qkv = (x @ W + b).reshape(B, n, w, 3, H, d)
        q, k, v = qkv.transpose(3, 0, 2, 4, 1, 5)
        o = attention.window_attention(q, k, v, d**-0.5)
        return o.transpose(0, 3, 1, 2, 4).reshape(B, n * w, C) @ Wp + bp

    def token_kernel(x, W, b, Wp, bp):
        return attention.attention(x @ W + b, H, w, d**-0.5) @ Wp + bp

    return {
        "current": current,
        "einsum_layout": einsum_layout,
        "dot_product_attention": dot_product_attention,
        "window_kernel": window_kernel,
        "token_kernel": token_kernel,
    }


def measure(stage: tuple[int, ...], device) -> list[dict]:
    B, n, w, C, H = stage
    sh = SingleDeviceSharding(device)
    shapes = [(B, n * w, C), (C, 3 * C), (3 * C,), (C, C), (C,)]
    args = tuple(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes)
    rows = []
    for name, f in formulations(*stage).items():

        def loss(a, f=f):
            return (f(*a).astype(jnp.float32) ** 2).sum()

        programs = {
            "forward": jax.jit(lambda a, f=f: f(*a), in_shardings=(sh,), out_shardings=sh),
            "forward + backward": jax.jit(
                jax.value_and_grad(loss), in_shardings=(sh,), out_shardings=sh
            ),
        }
        for what, fn in programs.items():
            with attention.compiling_for(device.device_kind):
                compiled = fn.lower(args).compile({"exec_time_optimization_effort": -1.0})
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            rows.append(
                {
                    "stage": stage,
                    "formulation": name,
                    "program": what,
                    "xla_mb_per_image": cost["bytes accessed"] / B / 1e6,
                    "estimate_mb_per_image": hlo_cost.bytes_accessed(compiled.as_text()) / B / 1e6,
                }
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, nargs=5, action="append", help="B n windows dim heads")
    args = parser.parse_args(argv)
    device = aot.topology_devices("v5e:2x2")[0]
    print(
        "| (B, n, windows, dim, heads) | formulation | program | XLA MB/image | estimate MB/image |"
    )
    print("| --- | --- | --- | ---: | ---: |")
    for stage in args.stage or STAGES:
        for r in measure(tuple(stage), device):
            print(
                f"| {r['stage']} | {r['formulation']} | {r['program']} | "
                f"{r['xla_mb_per_image']:.1f} | {r['estimate_mb_per_image']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
