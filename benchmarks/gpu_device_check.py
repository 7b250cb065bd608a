"""On a lent NVIDIA GPU: do our GPU kernels give XLA's numbers there, and are they faster?

Our GPU kernels (cuDNN's flash attention, the Triton MLP half) were built and checked without a
GPU: in Pallas' interpreter and as deviceless H100 programs. This is the check that needs the
device, prepared to run in one go within a lease:
1. values: a Hiera-B forward and the finetune loss's gradients in bfloat16, kernels ("auto")
   against XLA's ops ("xla"), same parameters and images; relative error of the logits and of
   every gradient leaf (bfloat16 arithmetic differs in rounding order: expect ~1e-2, not 1e-6);
2. speed: `bench_accel.py` for inference, the finetune and the MAE step, with each setting, in the
   same process, on the same device.

    python benchmarks/gpu_device_check.py --json gpu_check.json             # on the GPU machine
    python benchmarks/gpu_device_check.py --sizes base --batch 256 --repeats 5 --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import bench_accel  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sections import write_section  # noqa: E402

import hiera_jax  # noqa: E402

SECTION = "gpu-device-check"  # of BENCHMARKS.md


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def values(name: str, batch: int) -> dict:
    """Max relative error of the logits and of each gradient leaf, kernels against XLA's ops."""
    outs = {}
    x = jnp.asarray(np.random.RandomState(0).randn(batch, 224, 224, 3).astype(np.float32))
    y = jnp.arange(batch) % 1000
    params = None
    for kernels in ("xla", "auto"):
        model = hiera_jax.create_model(
            name, dtype="bfloat16", scan_blocks=False, attention_kernel=kernels, mlp_kernel=kernels
        )
        if params is None:
            params = hiera_jax.init_params(model, jax.random.key(0))

        def loss(p, model=model):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), y
            ).mean(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        outs[kernels] = (logits, grads)
    (l_xla, g_xla), (l_ker, g_ker) = outs["xla"], outs["auto"]
    errors = [rel(a, b) for a, b in zip(jax.tree.leaves(g_ker), jax.tree.leaves(g_xla))]
    return {
        "model": name,
        "batch": batch,
        "logits": rel(l_ker, l_xla),
        "grads_max": max(errors),
        "grads_median": float(np.median(errors)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["base"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    if device.platform != "gpu":
        raise SystemExit(f"needs a GPU; JAX sees {device.device_kind} ({device.platform})")
    check = values("hiera_base_224", 8)
    print(json.dumps(check), flush=True)
    tables = {}
    for kernels in ("xla", "auto"):
        common = ["--sizes", *args.sizes, "--batch", str(args.batch)]
        path = f"/tmp/gpu_check_{kernels}.json"
        bench_accel.main(
            [*common, "--repeats", str(args.repeats), "--kernels", kernels, "--json", path]
        )
        tables[kernels] = json.load(open(path))
    rows = []
    for before, after in zip(tables["xla"]["rows"], tables["auto"]["rows"]):
        mfu = "-" if after["mfu"] is None else f"{after['mfu']:.1%}"
        rows.append(
            f"| {after['case']} | {after['model']} | {after['batch']} | "
            f"{before['seconds'] * 1e3:.1f} | {after['seconds'] * 1e3:.1f} | "
            f"{before['seconds'] / after['seconds']:.2f}x | "
            f"{mfu} |"
        )
    text = "\n".join(
        [
            f"Device: {device.device_kind}, jax {jax.__version__}. Values, hiera_base_224 bf16, "
            f"batch 8, kernels against XLA's ops: logits {check['logits']:.2e}, gradients max "
            f"{check['grads_max']:.2e} (median leaf {check['grads_median']:.2e}).",
            "",
            "| case | model | batch | XLA's ops (ms) | our GPU kernels (ms) | speed-up | MFU |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    print(text)
    if args.json:
        json.dump({"values": check, "speed": tables}, open(args.json, "w"), indent=1)
    if args.write:
        command = "python benchmarks/gpu_device_check.py " + " ".join(argv or sys.argv[1:])
        write_section(SECTION, f"Made by `{command}`.\n\n{text}", append=True)


if __name__ == "__main__":
    main()
