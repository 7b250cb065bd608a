"""HBM traffic of Hiera's steps compiled for an H100, without a GPU: our GPU kernels against XLA's
plain ops in the same run, a plain ViT-B/16 as the anchor, and where the bytes go by model part.

Each row compiles one program deviceless (`train.py --aot`'s path, `hiera_jax.training.cost.aot`, with
jax's CUDA plugin: `pip install -e ".[gpu]"`) and counts its HBM traffic from the optimized HLO
(`hiera_jax.training.cost.hlo_cost`: every top-level instruction's operands and result; XLA's GPU
compiler has no cost analysis). Blocks unscanned, bfloat16 compute, float32 parameters, AdamW,
one GPU, the recipe's model otherwise. "xla" rows set `attention_kernel` and `mlp_kernel` to
"xla" (the program before the GPU kernels); "kernels" rows keep "auto" (the Triton attention,
MLP and LayerNorm kernels, cuDNN flash attention where they do not fit). The MFU ceiling is
model FLOPs / max(executed FLOPs at 989 TFLOP/s, bytes at 3.35 TB/s), where executed FLOPs add
what the kernels' backwards compute again (fc1, attention logits; `kernel_recompute_flops`): a
bound, not a measured speed. Compiled with
`xla_gpu_enable_triton_gemm=false` and without autotuning (no device): a GPU compiles a close, not
identical, program.

    pip install -e ".[train,gpu]"
    python benchmarks/gpu_traffic.py --write            # every row (about 20 minutes on 2 cores)
    python benchmarks/gpu_traffic.py --only finetune:base --variants kernels --write
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the GPU is compile-only; the host traces

import hbm_traffic  # noqa: E402
from sections import write_section  # noqa: E402

OUT = os.path.join(ROOT, "runs", "gpu_traffic")
SECTION = "gpu-traffic"  # of BENCHMARKS.md
TARGET = "h100:1"
PEAK, BANDWIDTH = 989e12, 3.35e12
# (row name, recipe or model, per-GPU batch, what): train steps of the recipes, inference
# (forward only, bf16) of the models, and the anchor.
ROWS = [
    ("finetune:base", "in1k_finetune:base", 64, "train"),
    ("mae:base", "in1k_mae:base", 256, "train"),
    ("finetune:tiny", "in1k_finetune:tiny", 64, "train"),
    ("mae:tiny", "in1k_mae:tiny", 256, "train"),
    ("finetune:large", "in1k_finetune:large", 64, "train"),
    ("inference:base", "hiera_base_224", 256, "inference"),
    ("vit-b/16", "vit", 64, "anchor"),
]


def _parts(text: str, per: int) -> dict:
    parts: dict = collections.defaultdict(collections.Counter)
    from hiera_jax.training.cost import hlo_cost

    for a in hlo_cost.accesses(text):
        part, direction, _ = hbm_traffic.part_of(a.op_name)
        parts[part][direction or "other"] += a.bytes * a.times / per
    return {k: dict(v) for k, v in parts.items()}


def train_row(recipe: str, per: int, kernels: str) -> dict:
    from hiera_jax.training.cost import aot

    config = hbm_traffic.load_config(recipe, per, 1)
    config.model.dtype = "bfloat16"
    if kernels == "xla":
        config.model.attention_kernel = "xla"
        config.model.mlp_kernel = "xla"
    seen: dict = {}
    report = aot.fit_check(
        config, TARGET, config_name=recipe, on_compiled=lambda c: seen.update(text=c.as_text())
    )
    fl = report["flops"]
    return {
        "bytes_per_image": fl["bytes_accessed_per_device"] / per,
        "flops_per_image": fl["model_per_example"],
        "recompute_per_image": fl.get("kernel_recompute_per_step", 0.0) / per,
        "peak_gib": report["memory"]["peak"] / 2**30,
        "parts": _parts(seen["text"], per),
        "custom_calls": _custom_calls(seen["text"]),
    }


def _custom_calls(text: str) -> list[str]:
    calls = {ln.split('custom_call_target="')[1].split('"')[0] for ln in text.splitlines()
             if 'custom_call_target="' in ln}  # fmt: skip
    return sorted(calls)


def _compile(fn, *args) -> str:
    import jax

    from hiera_jax.training.cost import aot

    device = jax.sharding.SingleDeviceSharding(aot.topology_devices(TARGET)[0])
    shaped = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), args)
    return jax.jit(fn).trace(*shaped).lower().compile(aot.GPU_COMPILE_OPTIONS).as_text()


def inference_row(name: str, batch: int, kernels: str) -> dict:
    import jax
    import jax.numpy as jnp

    import hiera_jax
    from hiera_jax.training.cost import flops, hlo_cost

    extra = {"attention_kernel": "xla", "mlp_kernel": "xla"} if kernels == "xla" else {}
    model = hiera_jax.create_model(name, dtype="bfloat16", scan_blocks=False, **extra)
    params = jax.eval_shape(lambda: hiera_jax.init_params(model, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)

    def forward(p, x):
        return model.apply({"params": p}, x)

    text = _compile(forward, params, x)
    count = flops.count_flops(forward, params, x, platform="cpu")
    return {
        "bytes_per_image": hlo_cost.bytes_accessed(text) / batch,
        "flops_per_image": count / batch,
        "parts": _parts(text, batch),
        "custom_calls": _custom_calls(text),
    }


def vit_row(batch: int, kernels: str) -> dict:
    """A plain Flax ViT-B/16 finetune step (bf16, f32 params, AdamW, exact GELU), with XLA's
    attention ("xla") or cuDNN's (`jax.nn.dot_product_attention`, "kernels")."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from hiera_jax.training.cost import flops, hlo_cost

    use = {"cudnn": kernels == "kernels"}  # off while counting FLOPs (on the CPU)

    def attention(q, k, v, *args, **kwargs):
        if use["cudnn"]:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        return nn.dot_product_attention(q, k, v)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)(x)
            h = nn.MultiHeadDotProductAttention(12, dtype=jnp.bfloat16, attention_fn=attention)(
                h, h
            )
            x = x + h
            h = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)(x)
            h = nn.gelu(nn.Dense(3072, dtype=jnp.bfloat16)(h), approximate=False)
            return x + nn.Dense(768, dtype=jnp.bfloat16)(h)

    class ViT(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(768, (16, 16), (16, 16), dtype=jnp.bfloat16)(x)
            x = x.reshape(x.shape[0], -1, 768)
            pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], 768))
            x = x + pos.astype(x.dtype)
            for _ in range(12):
                x = Block()(x)
            x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)(x).mean(1)
            return nn.Dense(1000, dtype=jnp.float32)(x)

    model, tx = ViT(), optax.adamw(1e-3, weight_decay=0.05)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    params = params["params"]
    opt = jax.eval_shape(tx.init, params)

    def step(params, opt, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    x = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    text = _compile(step, params, opt, x, y)
    use["cudnn"] = False  # the same model FLOPs through XLA's attention, which the CPU lowers
    fresh = lambda *a: step(*a)  # noqa: E731 - a new function: traced again, without cuDNN
    count = flops.count_flops(fresh, params, opt, x, y, platform="cpu")
    return {
        "bytes_per_image": hlo_cost.bytes_accessed(text) / batch,
        "flops_per_image": count / batch,
        "parts": {},
        "custom_calls": _custom_calls(text),
    }


def measure(row, kernels: str) -> dict:
    name, what, per, kind = row
    t0 = time.time()
    if kind == "train":
        result = train_row(what, per, kernels)
    elif kind == "inference":
        result = inference_row(what, per, kernels)
    else:
        result = vit_row(per, kernels)
    result.update(row=name, what=what, per_gpu=per, kind=kind, kernels=kernels)
    result["seconds"] = time.time() - t0
    return result


def ceiling(r: dict) -> float:
    """Model FLOPs over the bound of the program: its executed FLOPs (the kernels' recompute
    included) or its bytes, whichever takes longer."""
    model = r["flops_per_image"] / PEAK
    executed = (r["flops_per_image"] + r.get("recompute_per_image", 0.0)) / PEAK
    return model / max(executed, r["bytes_per_image"] / BANDWIDTH)


def table(results: dict) -> str:
    lines = [
        "| step | per GPU | GFLOP / image | XLA's ops: GB / image | ceiling | with our GPU kernels: "
        "GB / image | + GFLOP computed again | ceiling | cut |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, what, per, kind in ROWS:
        before, after = results.get((name, "xla")), results.get((name, "kernels"))
        if not before or not after:
            continue
        label = f"{kind} `{what}`" if kind != "anchor" else "plain Flax ViT-B/16 finetune (anchor)"
        lines.append(
            f"| {label} | {per} | {after['flops_per_image'] / 1e9:.1f} | "
            f"{before['bytes_per_image'] / 1e9:.3f} | {ceiling(before):.0%} | "
            f"**{after['bytes_per_image'] / 1e9:.3f}** | "
            f"{after.get('recompute_per_image', 0.0) / 1e9:.1f} | {ceiling(after):.0%} | "
            f"{1 - after['bytes_per_image'] / before['bytes_per_image']:.0%} |"
        )
    split = [
        (name, results[(name, "xla")], results[(name, "kernels")])
        for name in ("finetune:base", "mae:base")
        if (name, "xla") in results and (name, "kernels") in results
    ]
    if not split:
        return "\n".join(lines)
    lines += [
        "",
        "Where the bytes go, MB per image, forward / backward (the optimizer and RNG: one figure):",
        "",
        "| part | " + " | ".join(f"{n}: XLA's ops | {n}: our kernels" for n, _, _ in split) + " |",
        "| --- |" + " ---: |" * (2 * len(split)),
    ]

    def cell(v: dict) -> str:
        if not v:
            return "-"
        f, w, o = (v.get(k, 0.0) / 1e6 for k in ("forward", "backward", "other"))
        return f"{o:.0f}" if o and not (f or w) else f"{f:.0f} / {w:.0f}"

    for part in hbm_traffic.PARTS:
        cells = [cell(r["parts"].get(part, {})) for _, b, a in split for r in (b, a)]
        if any(c != "-" for c in cells):
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="row names (default: all)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--reuse", action="store_true", help="keep rows measured before")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("xla", "kernels"),
        default=("xla", "kernels"),
        help="which programs of the --only rows to compile (the others are read back)",
    )
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    results = {}
    for row in ROWS:
        for kernels in ("xla", "kernels"):
            path = os.path.join(OUT, f"{row[0].replace(':', '_').replace('/', '_')}_{kernels}.json")
            skip = args.only and row[0] not in args.only or kernels not in args.variants
            if (args.reuse or skip) and os.path.exists(path):
                results[(row[0], kernels)] = json.load(open(path))
                continue
            if skip:
                continue
            result = measure(row, kernels)
            json.dump(result, open(path, "w"), indent=1)
            results[(row[0], kernels)] = result
            print(
                f"{row[0]} {kernels}: {result['bytes_per_image'] / 1e9:.3f} GB/image, "
                f"{result['flops_per_image'] / 1e9:.1f} GFLOP/image, ceiling "
                f"{ceiling(result):.0%} ({result['seconds']:.0f} s)",
                flush=True,
            )
    text = table(results)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
