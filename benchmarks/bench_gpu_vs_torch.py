"""GPU side by side: our inference, finetune step and MAE step against the official
PyTorch Hiera (`hiera-transformer`) and timm's Hiera, each under bf16 autocast, eager and with
`torch.compile`, on the same batch and input size, in one process: images/s and MFU for all.

    python benchmarks/bench_gpu_vs_torch.py --sizes tiny base --batch 256 --write   # a GPU
    python benchmarks/bench_gpu_vs_torch.py --sizes base --impls ours timm --modes compile
    python benchmarks/bench_gpu_vs_torch.py --smoke     # a CPU, about 1.5 min (the tests run it)

What runs:
- ours: `bench_accel`'s steps, built as `train.py` builds them from the in1k recipes (bf16
  compute, float32 parameters, AdamW with layer decay, label smoothing 0.1, the recipe's drop
  path; MAE mask ratio 0.6).
- official and timm: the model with float32 parameters under `torch.autocast(bfloat16)`.
  Inference: `model.eval()` under `torch.no_grad()` (the official head adds its softmax there).
  Finetune step: forward, cross-entropy on random labels (label smoothing 0.1), backward,
  `AdamW(fused=True)`, `zero_grad(set_to_none=True)`. MAE step: the model's own loss (mask
  ratio 0.6), backward, AdamW. Drop path as in our recipe. Each eager and as `torch.compile(model)`
  (default mode); a failure (a compile error, out of memory) becomes a row with its error.
  timm has no MAE Hiera: the MAE step compares ours with the official code only.

Timing: the median of per-step times over `--repeats` steps after 2 warm-ups (where the
compiles happen), each step waited for on the device (`block_until_ready`,
`torch.cuda.synchronize`), on random data already there. Per size and case ours runs first, then
the official and timm models eager, then compiled; memory is freed between configurations.

MFU = model FLOPs per step / (median step time x the chip's dense bf16 peak). The FLOPs are one
figure per case and size, used for every row of it: XLA's count of our step, as bench_accel
counts it. So MFU compares like with like, the same work divided by each implementation's time,
and its ratio between rows is their speed ratio. Peak from `hiera_jax.training.cost.chips`, `--peak`
overrides; none on a CPU (MFU "-").

Both frameworks share the GPU: JAX is told not to preallocate (XLA_PYTHON_CLIENT_PREALLOCATE,
set before jax is imported). One device only. Each row is printed as a JSON line when measured
and `--json` rewrites its file after each row, so a run stopped early keeps what it measured;
no configuration starts after `--budget` seconds (its rows are listed as skipped), so the table
is printed, and written with `--write`, inside a short lease.

`--smoke`: tiny at 64x64, float32, batch 2, 1 repeat, torch on the CPU with one thread (the
2-thread default spun on a shared CPU, 50x slower), eager only: the compile rows are listed as
skipped unless `--modes` names them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

# Before jax is imported (bench_accel imports it): JAX would otherwise take 75% of the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_accel  # noqa: E402 - puts the repository root on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from sections import write_section  # noqa: E402

from hiera_jax.training import sharding  # noqa: E402
from hiera_jax.training.cost import flops as flops_lib  # noqa: E402
from hiera_jax.training.setup import (  # noqa: E402
    EXECUTION_SWITCHES,
    build_setup,
    model_flops_per_step,
)

ROOT = bench_accel.ROOT
SECTION = "gpu-vs-torch"  # of BENCHMARKS.md
CASES = {"inference": "inference", "finetune": "finetune step", "mae": "MAE step"}
IMPLS = ("ours", "official", "timm")
MODES = ("eager", "compile")
IMPL_NAMES = {
    "ours": "ours (hiera-jax)",
    "official": "official (hiera-transformer)",
    "timm": "timm (SDPA)",
}
WARMUP = 2  # as bench_accel.timed
DEFAULT_BATCH = {"tiny": 256, "small": 256, "base": 256, "base_plus": 128, "large": 128, "huge": 64}
SMOKE_COMPILE = "torch.compile is not run in --smoke (CPU)"


def version(dist: str) -> str:
    """An installed distribution's version, for the header (the GPU image has its own)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def task_of(case: str) -> str:
    return "mae" if case == "mae" else "classification"


def model_name(case: str, size: str) -> str:
    return f"{'mae_' if case == 'mae' else ''}hiera_{size}_224"


def mode_name(impl: str, mode: str, smoke: bool) -> str:
    """What the row's numbers ran as: "jax bf16", "torch bf16 autocast eager", ..."""
    if impl == "ours":
        return "jax fp32" if smoke else "jax bf16"
    precision = "torch fp32" if smoke else "torch bf16 autocast"
    return f"{precision} eager" if mode == "eager" else f"{precision} + torch.compile"


# --- ours (JAX) -------------------------------------------------------------------------------


def bench_ours(case: str, size: str, batch: int, repeats: int, smoke: bool) -> dict:
    """bench_accel's row for `case`: the step train.py builds, timed, with XLA's FLOP count."""
    if case == "inference":
        return bench_accel.bench_inference(size, batch, None, repeats, smoke)
    return bench_accel.bench_train(task_of(case), size, batch, None, repeats, smoke)


def case_flops(case: str, size: str, batch: int, smoke: bool) -> float | None:
    """The case's model FLOPs without running our step (when ours is not run, or failed): the
    count bench_accel makes, on shapes only (nothing is compiled or allocated)."""
    if case == "inference":
        import hiera_jax

        overrides: dict[str, Any] = {"dtype": "float32" if smoke else "bfloat16"}
        if smoke:
            overrides["input_size"] = (64, 64)
        model = hiera_jax.create_model(f"hiera_{size}_224", **overrides)
        off = {f: False for f in EXECUTION_SWITCHES if hasattr(model.config, f)}
        model = model.clone(config=model.config.replace(**off))
        params = jax.eval_shape(lambda k: hiera_jax.init_params(model, k), jax.random.key(0))
        x = jax.ShapeDtypeStruct((batch, *model.config.input_size, 3), jnp.float32)

        def apply(p, x):
            return model.apply(p, x, train=False)

        return flops_lib.model_flops(apply, {"params": params}, x)
    config = bench_accel.recipe(task_of(case), size, batch, smoke, None)
    mesh = sharding.create_mesh(config.mesh_shape)
    setup = build_setup(config, mesh, batch * 1000)
    with jax.set_mesh(mesh):
        return model_flops_per_step(setup, setup.abstract_train_args(jax.random.key(0)))


# --- PyTorch ----------------------------------------------------------------------------------


def torch_model(impl: str, case: str, size: str, input_size: tuple[int, int], drop_path: float):
    """A freshly initialised official or timm model at `input_size` (random weights)."""
    if impl == "official":
        with warnings.catch_warnings():  # hiera imports timm.models.layers (deprecated)
            warnings.simplefilter("ignore", FutureWarning)
            import hiera
        build = getattr(hiera, model_name(case, size))
        return build(input_size=input_size, drop_path_rate=drop_path)
    import timm

    return timm.create_model(
        f"hiera_{size}_224", pretrained=False, img_size=input_size, drop_path_rate=drop_path
    )


def torch_timed(step: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of `step()` over `repeats` calls after WARMUP, each synchronised: the
    same protocol as bench_accel.timed."""
    for _ in range(WARMUP):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_torch(
    impl: str, case: str, size: str, batch: int, mode: str, repeats: int, smoke: bool
) -> dict:
    """One PyTorch configuration, timed; everything it allocated is garbage once it returns."""
    import torch
    import torch.nn.functional as F

    config = bench_accel.recipe(task_of(case), size, batch, smoke, None)
    input_size = (64, 64) if smoke else (224, 224)
    drop_path = 0.0 if case == "inference" else float(config.model.drop_path_rate)
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    torch.manual_seed(0)
    model = torch_model(impl, case, size, input_size, drop_path).to(device)
    model.train(case != "inference")
    run = torch.compile(model) if mode == "compile" else model
    x = torch.randn(batch, 3, *input_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def autocast():
        if smoke:  # float32, as our smoke rows
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    if case == "inference":

        def step():
            with torch.no_grad(), autocast():
                return run(x)

    else:
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=1e-4,
            betas=(config.optim.b1, config.optim.b2),
            weight_decay=config.optim.weight_decay,
            **fused,
        )
        mask_ratio = float(config.model.mask_ratio) if case == "mae" else 0.0  # the recipe's
        smoothing = float(config.label_smoothing)

        def step():
            with autocast():
                if case == "mae":
                    loss = run(x, mask_ratio=mask_ratio)[0]
                else:
                    loss = F.cross_entropy(run(x).float(), labels, label_smoothing=smoothing)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = torch_timed(step, repeats, sync)
    return {
        "case": CASES[case],
        "model": model_name(case, size),
        "batch": batch,
        "dtype": "float32" if smoke else "bfloat16 autocast",
        "torch_device": str(device),
        "seconds": seconds,
    }


def free_memory() -> None:
    """Give back what the last configuration held, so the next one (either framework) has it."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        torch._dynamo.reset()  # compiled graphs hold their buffers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the run ----------------------------------------------------------------------------------


def plan(case: str, impls: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """(implementation, mode) in run order: ours, then eager, then compiled; timm has no MAE."""
    torch_impls = [
        i for i in ("official", "timm") if i in impls and not (i == "timm" and case == "mae")
    ]
    out = [("ours", "jax")] if "ours" in impls else []
    for mode in MODES:
        if mode in modes:
            out += [(impl, mode) for impl in torch_impls]
    return out


def error_text(e: BaseException) -> str:
    """The first line of an exception, short enough for a table cell."""
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text[:200]


def finish_row(row: dict, ours: dict | None, flops: float | None, peak: float | None) -> dict:
    """Rates for a measured row, from the case's one FLOP figure; `vs_ours` = our images/s
    divided by this row's (above 1: ours is faster)."""
    row["flops"] = flops
    if row.get("seconds"):
        bench_accel.with_rates(row, peak)
    else:
        row.update(images_per_sec=None, tflops_per_device=None, mfu=None)
    have = ours is not None and ours.get("images_per_sec") and row["images_per_sec"]
    row["vs_ours"] = ours["images_per_sec"] / row["images_per_sec"] if have else None
    return row


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], header: str) -> str:
    """The markdown table: one row per case, size, implementation and mode."""
    lines = [
        header,
        "",
        "| case | model | implementation | batch | mode | step (ms) | images/s | MFU "
        "| ours / this (images/s; >1: ours faster) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        start = (
            f"| {r['case']} | {r['model']} | {IMPL_NAMES[r['impl']]} | {r['batch']} | {r['mode']} |"
        )
        if r.get("seconds"):
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            if r["impl"] == "ours":
                vs = "-"
            else:
                vs = f"{r['vs_ours']:.2f}x" if r.get("vs_ours") else "-"
            lines.append(
                f"{start} {r['seconds'] * 1e3:.1f} | {r['images_per_sec']:,.0f} | {mfu} | {vs} |"
            )
        else:
            why = f"skipped: {r['skipped']}" if r.get("skipped") else f"failed: {r.get('error')}"
            lines.append(f"{start} - | - | - | {_cell(why)} |")
    lines += [
        "",
        "MFU: the case's model FLOPs per step (XLA's count of our step, the same figure for every "
        "row of a case and size) / step time / peak. timm has no MAE Hiera: the MAE step is "
        "compared with the official code only.",
    ]
    return "\n".join(lines)


def write(text: str, command: str) -> None:
    write_section(SECTION, f"Made by `{command}`.\n\n{text}", append=True)


def header_line(device: str, torch_device: str, peak: float | None, repeats: int) -> str:
    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown (no MFU)"
    return (
        f"Device: {device} (torch: {torch_device}); jax {jax.__version__}, "
        f"torch {version('torch')}, timm {version('timm')}, "
        f"hiera-transformer {version('hiera-transformer')}; peak {peak_text}; "
        f"median of {repeats} steps after {WARMUP} warm-ups."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=0, help="batch (default 256 for tiny/base)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per row")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument(
        "--modes", nargs="*", default=None, choices=list(MODES), help="torch modes (default both)"
    )
    parser.add_argument("--peak", type=float, default=0.0, help="peak FLOP/s per device")
    parser.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="start no configuration after this many s (0: none)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny at 64x64, fp32, CPU, eager")
    parser.add_argument("--json", help="also write the rows as JSON here (after every row)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.smoke and args.write:
        parser.error("--write records GPU figures; not with --smoke")
    if jax.device_count() != 1:
        parser.error(f"one device only (jax sees {jax.device_count()}): set CUDA_VISIBLE_DEVICES")
    t_start = time.perf_counter()
    modes = args.modes if args.modes is not None else list(MODES)
    skip_compile = args.smoke and args.modes is None
    if args.smoke:
        args.sizes, args.repeats = ["tiny"], 1
        import torch

        torch.set_num_threads(1)
    device = jax.devices()[0].device_kind
    peak = flops_lib.peak_flops_per_device(device, args.peak)
    torch_device = "cpu"
    if not args.smoke and {"official", "timm"} & set(args.impls):
        import torch

        torch_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        torch.backends.cudnn.benchmark = True  # the patch embedding's convolution, fixed shapes
    header = header_line(device, torch_device, peak, args.repeats)
    print(header, flush=True)
    rows: list[dict] = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"header": header, "device": device, "peak": peak, "rows": rows}, f, indent=2
                )

    for size in args.sizes:
        batch = args.batch or (2 if args.smoke else DEFAULT_BATCH[size])
        for case in args.cases:
            ours: dict | None = None
            flops: float | None = None
            counted = False  # the case's FLOPs: ours' count, else case_flops, tried once
            for impl, mode in plan(case, args.impls, modes):
                base = {
                    "case": CASES[case],
                    "model": model_name(case, size),
                    "size": size,
                    "impl": impl,
                    "batch": batch,
                    "mode": mode_name(impl, mode, args.smoke),
                    "compile": mode == "compile",
                    "seconds": None,
                }
                t0 = time.perf_counter()
                if mode == "compile" and skip_compile:
                    row = {**base, "skipped": SMOKE_COMPILE}
                elif args.budget and t0 - t_start > args.budget:
                    row = {**base, "skipped": f"past --budget {args.budget:.0f} s"}
                else:
                    try:
                        if impl == "ours":
                            row = {
                                **base,
                                **bench_ours(case, size, batch, args.repeats, args.smoke),
                            }
                        else:
                            row = {
                                **base,
                                **bench_torch(
                                    impl, case, size, batch, mode, args.repeats, args.smoke
                                ),
                            }
                    except Exception as e:  # noqa: BLE001 - one failed row must not end the run
                        row = {**base, "error": error_text(e)}
                    free_memory()
                row["wall_s"] = time.perf_counter() - t0  # build + compile + warm-up + timing
                if impl == "ours":
                    flops, ours, counted = row.get("flops"), row, row.get("flops") is not None
                if not counted and impl != "ours" and not row.get("skipped"):
                    counted = True
                    try:  # ours not run or failed: count the same FLOPs on shapes only
                        flops = case_flops(case, size, batch, args.smoke)
                    except Exception as e:  # noqa: BLE001 - MFU is a report
                        print(f"no FLOP count for {case} {size}: {error_text(e)}", flush=True)
                rows.append(finish_row(row, ours, flops, peak))
                print(json.dumps(row), flush=True)
                save()
    text = table(rows, header)
    print(text, flush=True)
    if args.write:
        write(text, "python benchmarks/bench_gpu_vs_torch.py " + " ".join(argv or sys.argv[1:]))
    return rows


if __name__ == "__main__":
    main()
