"""Images/s and MFU of Hiera on whatever accelerator JAX sees: bf16 inference, the finetune step
and the MAE step, built exactly as `train.py` builds them (the in1k recipes' configs).

    python benchmarks/bench_accel.py                       # tiny, base, large on this accelerator
    python benchmarks/bench_accel.py --sizes base --batch 128 --write   # and update BENCHMARKS.md
    python benchmarks/bench_accel.py --smoke               # seconds on a CPU (the test suite runs it)

MFU = model FLOPs per step (XLA's count of the step without remat) / (median step time x devices
x the chip's dense bf16 peak, `hiera_jax.training.cost.chips`). `--peak` overrides the peak. Steps
are timed after a warm-up, with `block_until_ready`, on random data already on the device.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sections import write_section  # noqa: E402

from hiera_jax.models.scan import use_scan  # noqa: E402
from hiera_jax.training import sharding  # noqa: E402
from hiera_jax.training.cost import chips  # noqa: E402
from hiera_jax.training.cost import flops as flops_lib  # noqa: E402
from hiera_jax.training.setup import (  # noqa: E402
    EXECUTION_SWITCHES,
    build_setup,
    model_flops_per_step,
)

SECTION = "bench-accel"  # of BENCHMARKS.md


KERNELS = "auto"  # --kernels: the models' attention_kernel and mlp_kernel


def recipe(task: str, size: str, batch: int, smoke: bool, scan: bool | None):
    """The in1k recipe for `task` at `size`, with `batch`, `scan_blocks` (None: automatic, off
    on a GPU), the kernels of --kernels and (smoke) a tiny input."""
    from configs import in1k_finetune, in1k_mae

    config = (in1k_mae if task == "mae" else in1k_finetune).get_config(size)
    config.batch_size = batch
    config.eval_batch_size = batch
    config.total_steps = 1000
    config.mesh_shape = (-1, 1)  # one host: data parallel over its devices
    config.model.scan_blocks = scan
    config.model.attention_kernel = config.model.mlp_kernel = KERNELS
    if smoke:
        config.model.input_size = (64, 64)  # 16x16 tokens, 2x2 mask units
        config.model.dtype = "float32"
    return config


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (blocked until ready) over `repeats` calls after 2 warm-ups."""
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_runner(config, batch: int):
    """The recipe's jitted train step on random data already on the devices, as `train.py`
    builds it: (mesh, setup, abstract step arguments, jitted step, `step()`), where `step()` runs
    one step, carrying the state, and returns its metrics. Call `step()` under `jax.set_mesh(mesh)`."""
    mesh = sharding.create_mesh(config.mesh_shape)
    setup = build_setup(config, mesh, batch * 1000)
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        state = jax.jit(setup.init_state, out_shardings=setup.state_sh)(key)
        p_train = setup.jit_train_step()
        args = setup.abstract_train_args(key)
        shape = args[1]["image"].shape
        batch_data = {
            "image": jax.device_put(np.random.randn(*shape).astype(np.float32), setup.batch_sh)
        }
        if setup.with_labels:
            labels = np.eye(setup.model_config.num_classes, dtype=np.float32)[np.arange(batch) % 10]
            batch_data["label"] = jax.device_put(labels, setup.batch_sh)
    holder = {"state": state}

    def step():
        holder["state"], metrics = p_train(holder["state"], batch_data, key)
        return metrics

    return mesh, setup, args, p_train, step


def bench_train(
    task: str, size: str, batch: int, scan: bool | None, repeats: int, smoke: bool
) -> dict:
    config = recipe(task, size, batch, smoke, scan)
    mesh, setup, args, p_train, step = train_runner(config, batch)
    with jax.set_mesh(mesh):
        model_flops = model_flops_per_step(setup, args, p_train)
        seconds = timed(step, repeats)
    return {
        "case": "finetune step" if task == "classification" else "MAE step",
        "model": config.model.name,
        "batch": batch,
        "dtype": setup.model_config.dtype,
        "remat": setup.model_config.remat,
        "scan_blocks": use_scan(setup.model_config),
        "seconds": seconds,
        "flops": model_flops,
    }


def bench_inference(size: str, batch: int, scan: bool | None, repeats: int, smoke: bool) -> dict:
    import hiera_jax

    overrides = {"dtype": "float32" if smoke else "bfloat16", "scan_blocks": scan}
    overrides.update(attention_kernel=KERNELS, mlp_kernel=KERNELS)
    if smoke:
        overrides["input_size"] = (64, 64)
    model = hiera_jax.create_model(f"hiera_{size}_224", **overrides)
    params = hiera_jax.init_params(model, jax.random.key(0))
    x = jnp.asarray(np.random.randn(batch, *model.config.input_size, 3).astype(np.float32))
    forward = jax.jit(functools.partial(model.apply, train=False))
    # Counted with execution switches off: XLA counts a scanned body once.
    off = {f: False for f in EXECUTION_SWITCHES if hasattr(model.config, f)}
    count_model = model.clone(config=model.config.replace(**off))

    def apply(p, x):
        return count_model.apply(p, x, train=False)

    flops = flops_lib.model_flops(apply, {"params": params}, x)
    seconds = timed(lambda: forward({"params": params}, x), repeats)
    return {
        "case": "inference",
        "model": f"hiera_{size}_224",
        "batch": batch,
        "dtype": model.config.dtype,
        "remat": False,
        "scan_blocks": use_scan(model.config),
        "seconds": seconds,
        "flops": flops,
    }


def with_rates(row: dict, peak: float | None) -> dict:
    n = jax.device_count()
    row["images_per_sec"] = row["batch"] / row["seconds"]
    row["tflops_per_device"] = (row["flops"] or 0) / row["seconds"] / n / 1e12
    row["mfu"] = row["tflops_per_device"] * 1e12 / peak if peak and row["flops"] else None
    return row


def table(rows: list[dict], device: str, peak: float | None) -> str:
    lines = [
        f"Device: {jax.device_count()} x {device}; jax {jax.__version__}; kernels {KERNELS}; peak "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16 per device" if peak else "unknown (no MFU)"),
        "",
        "| case | model | batch | dtype | remat | scan | step (ms) | images/s | TFLOP/s/device | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(
            f"| {r['case']} | {r['model']} | {r['batch']} | {r['dtype']} | "
            f"{'yes' if r['remat'] else 'no'} | {'yes' if r.get('scan_blocks') else 'no'} | "
            f"{r['seconds'] * 1e3:.1f} | "
            f"{r['images_per_sec']:.0f} | {r['tflops_per_device']:.1f} | {mfu} |"
        )
    return "\n".join(lines)


def write(text: str, command: str) -> None:
    write_section(SECTION, f"Made by `{command}`.\n\n{text}", append=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "base", "large"])
    parser.add_argument("--batch", type=int, default=0, help="global batch (default by size)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak", type=float, default=0.0, help="peak FLOP/s per device")
    parser.add_argument("--smoke", action="store_true", help="tiny at 64x64, 1 repeat (CPU)")
    parser.add_argument(
        "--cases", nargs="*", default=["inference", "finetune", "mae"], help="which steps"
    )
    scan = parser.add_mutually_exclusive_group()
    scan.add_argument("--scan", dest="scan", action="store_true", default=None, help="scan on")
    scan.add_argument("--no-scan", dest="scan", action="store_false", help="model.scan_blocks off")
    parser.add_argument(
        "--kernels",
        choices=["auto", "xla"],
        default="auto",
        help="attention_kernel and mlp_kernel: auto (the accelerator's kernels) or xla",
    )
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats = ["tiny"], 1
    global KERNELS
    KERNELS = args.kernels
    device = jax.devices()[0].device_kind
    peak = args.peak or (chips.chip_for(device).peak_bf16_flops if chips.chip_for(device) else None)
    default_batch = {
        "tiny": 256,
        "small": 256,
        "base": 256,
        "base_plus": 128,
        "large": 128,
        "huge": 64,
    }
    rows = []
    for size in args.sizes:
        batch = args.batch or (2 * jax.device_count() if args.smoke else default_batch[size])
        runs = {
            "inference": functools.partial(bench_inference, size, batch, args.scan),
            "finetune": functools.partial(bench_train, "classification", size, batch, args.scan),
            "mae": functools.partial(bench_train, "mae", size, batch, args.scan),
        }
        for run in (runs[case] for case in args.cases):
            row = with_rates(run(args.repeats, args.smoke), peak)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
    text = table(rows, device, peak)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "peak": peak, "rows": rows}, f, indent=2)
    if args.write:
        write(text, "python benchmarks/bench_accel.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
