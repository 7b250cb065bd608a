"""Fit every training recipe on realistic TPU slices, ahead of time, and write the table.

Runs `train.py --config RECIPE --aot TOPOLOGY` (the real TPU compiler via libtpu, on this CPU;
nothing is executed) for each row of MATRIX, in order, and keeps each report under
`runs/aot_table/`. A row that does not fit is retried with the smallest change that makes it
fit, in FIXES order, and both rows go in the table. Rows already measured are reused, so the
script can be stopped and rerun.

    python benchmarks/aot_table.py                     # all rows (hours on 2 cores)
    python benchmarks/aot_table.py --only in1k_mae:base --write
    python benchmarks/aot_table.py --write-only        # rebuild the table from saved reports
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

from sections import read_section, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "runs", "aot_table")
SECTION = "aot-table"  # of BENCHMARKS.md

# (recipe, topology, slices[, overrides]): slices named as Cloud TPU sells them.
SLICE_NAMES = {
    "v5e:8x8": "v5e-64 (64 chips)",
    "v5e:16x16": "v5e-256 (256 chips)",
    "v5p:4x4x2": "v5p-64 (32 chips)",
    "v5p:4x4x4": "v5p-128 (64 chips)",
    "v4:4x4x2": "v4-64 (32 chips)",
    "v6e:8x8": "v6e-64 (64 chips)",
    "v5e:4x4": "v5e-16 (16 chips)",
    "h100:8": "8 x H100 SXM (one host)",
    "h200:8": "8 x H200 (one host)",
}
MATRIX: list[tuple] = [
    ("in1k_mae:base", "v5e:8x8", 1),
    ("in1k_mae:base", "v5p:4x4x2", 1),
    ("in1k_mae:base", "v5e:8x8", 2),  # multi-slice: 2 x v5e-64, data parallel over DCN
    ("in1k_mae:large", "v5e:8x8", 1),
    ("in1k_mae:large", "v5p:4x4x2", 1),
    ("in1k_finetune:base", "v5e:8x8", 1),
    ("in1k_finetune:base", "v4:4x4x2", 1),
    ("in1k_finetune:large", "v5e:8x8", 1),
    ("k400_mae:base", "v5e:8x8", 1),
    ("k400_finetune:base", "v5e:8x8", 1),
    ("in1k_mae:huge", "v5p:4x4x2", 1),
    ("in1k_finetune:huge", "v5p:4x4x2", 1),
    ("k400_mae:large", "v5p:4x4x2", 1),
    ("k400_finetune:large", "v5p:4x4x2", 1),
    ("in1k_mae:tiny", "v5e:8x8", 1),
    ("in1k_mae:small", "v5e:8x8", 1),
    ("in1k_mae:base_plus", "v5e:8x8", 1),
    ("in1k_finetune:tiny", "v5e:8x8", 1),
    ("in1k_finetune:small", "v5e:8x8", 1),
    ("in1k_finetune:base_plus", "v5e:8x8", 1),
    ("in1k_mae:huge", "v5e:16x16", 1),
    ("k400_mae:huge", "v5p:4x4x4", 1),
    ("k400_finetune:huge", "v5p:4x4x4", 1),
    ("in1k_mae:large", "v6e:8x8", 1),
    # Are the recipes' remat/FSDP defaults needed? The same steps without them (large's MAE
    # recipe has no remat: the row with it shows what remat would cost).
    ("in1k_mae:large", "v5e:8x8", 1, {"model.remat": "True"}),
    ("in1k_mae:large", "v5e:8x8", 1, {"model.remat": "False", "mesh_shape": "(-1,1)"}),
    ("in1k_mae:huge", "v5p:4x4x2", 1, {"model.remat": "False"}),
    ("in1k_finetune:large", "v5e:8x8", 1, {"model.remat": "False"}),
    # Smaller slices at the published batch: what breaks first, and the smallest fix.
    ("in1k_mae:base", "v5e:4x4", 1),
    ("in1k_mae:huge", "v5e:8x8", 1),
    ("k400_mae:base", "v5e:4x4", 1),
    # NVIDIA GPUs (the gpu extra; XLA's GPU compiler without a GPU, see aot.py): the recipes'
    # batches on one 8-GPU host, checked against JAX's default pool (75% of each GPU).
    ("in1k_mae:base", "h100:8", 1),
    ("in1k_finetune:base", "h100:8", 1),
    ("in1k_mae:large", "h100:8", 1),
    ("in1k_finetune:large", "h100:8", 1),
    ("k400_mae:base", "h100:8", 1),
    ("in1k_mae:huge", "h200:8", 1),
]
# Tried in order on a row that does not fit; the first that fits is reported.
FIXES: list[dict[str, str]] = [
    {"model.remat": "True"},
    {"model.remat": "True", "grad_accum_steps": "2"},
    {"model.remat": "True", "grad_accum_steps": "4"},
]


def slug(recipe: str, topology: str, slices: int, fix: dict[str, str]) -> str:
    parts = [recipe.replace(":", "-"), topology.replace(":", "-"), f"{slices}s"]
    parts += [f"{k.split('.')[-1]}{re.sub(r'[^0-9A-Za-z-]', '', v)}" for k, v in fix.items()]
    return "_".join(parts)


def run_one(recipe, topology, slices, fix, effort) -> dict:
    workdir = os.path.join(OUT, slug(recipe, topology, slices, fix))
    name = f"aot_{topology}" + (f"_{slices}slices" if slices > 1 else "") + ".json"
    path = os.path.join(workdir, name)
    if os.path.exists(path):
        return json.load(open(path))
    config, _, size = recipe.partition(":")
    command = [sys.executable, "train.py", "--config", f"configs/{config}.py:{size}"]
    command += ["--workdir", workdir, "--aot", topology, f"--aot_slices={slices}"]
    command += [f"--aot_effort={effort}"] + [f"--config.{k}={v}" for k, v in fix.items()]
    t0 = time.time()
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    print(f"{recipe} {topology} x{slices} {fix}: exit {run.returncode} in {time.time() - t0:.0f} s")
    print("   ", (run.stdout.strip().splitlines() or [""])[-1] or run.stderr.strip()[-400:])
    if not os.path.exists(path):  # an error that is not a verdict: keep the message
        os.makedirs(workdir, exist_ok=True)
        report = {"error": run.stderr.strip()[-2000:], "fits": None}
        json.dump(report, open(path, "w"))
        return report
    return json.load(open(path))


def measure(rows, effort) -> None:
    for recipe, topology, slices, *rest in rows:
        base = rest[0] if rest else {}
        report = run_one(recipe, topology, slices, base, effort)
        if report.get("fits") is False:
            for fix in FIXES:
                if run_one(recipe, topology, slices, {**base, **fix}, effort).get("fits"):
                    break


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def _mb(x) -> str:
    return "-" if not x else f"{x / 1e6:.0f}"


def _scan(report: dict) -> str:
    """Reports written before `scan_blocks` was recorded compiled every block on its own."""
    return "yes" if report.get("scan_blocks") else "no"


GPU_SECTION = "gpu-aot-table"  # the GPU rows, a table of their own
GPU_CHIPS = ("a100", "h100", "h200", "b200")


def is_gpu(topology: str) -> bool:
    return topology.split(":")[0].split("-")[0] in GPU_CHIPS


def table(gpu: bool = False) -> str:
    reports = []
    for path in sorted(glob.glob(os.path.join(OUT, "*", "aot_*.json"))):
        r = json.load(open(path))
        if "topology" in r and is_gpu(r["topology"]) == gpu:
            reports.append(r)
    order: dict = {}
    for i, m in enumerate(MATRIX):
        order.setdefault((m[0], m[1], m[2]), i)  # a row's first place in MATRIX

    def key(r):
        row = order.get((r["config"], r["topology"], r["num_slices"]), 999)
        return (row, r["remat"], r["grad_accum_steps"])

    lines = [
        "| recipe | slice | mesh (data, fsdp) | batch / device | remat, accum | peak / HBM per device (GiB) | fits | step >= (ms) | MFU ceiling | HBM GB / image | model TFLOP/step | collectives | scan | code (MB) | compile (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(reports, key=key):
        slices = SLICE_NAMES.get(r["topology"], r["topology"])
        if r["num_slices"] > 1:
            slices = f"{r['num_slices']} x {slices}"
        mesh = f"({r['mesh']['data']}, {r['mesh']['fsdp']})"
        mem = r.get("memory") or {}
        if r["fits"]:
            peak = f"{_gib(mem.get('peak'))} / {_gib(r['hbm_per_device_bytes'])}"
        else:
            need, have = mem.get("needed"), mem.get("available")
            peak = f"needs {need / 2**30:.2f} / {have / 2**30:.2f}" if need and have else "needs ?"
        roof = r.get("roofline") or {}
        step = f"{roof['step_lower_bound_seconds'] * 1e3:.0f}" if roof else "-"
        mfu = f"{roof['mfu_ceiling']:.0%}" if roof.get("mfu_ceiling") else "-"
        flops = (r.get("flops") or {}).get("model_per_step")
        traffic = (r.get("flops") or {}).get("bytes_accessed_per_device")
        per_image = (
            f"{traffic / r['per_device_batch'] / 1e9:.2f}"
            if traffic and "xla_bytes_accessed_per_device" in r["flops"]
            else "-"  # reports from before loops were counted: XLA's loop-once figure
        )
        coll = r.get("collectives") or {}
        coll_text = ", ".join(
            f"{re.sub(r'(^|-)(.)[a-z]*', lambda m: m[2].upper(), op)} {v['count']}"
            for op, v in coll.items()
        )
        lines.append(
            f"| {r['config']} | `{r['topology']}` {slices} | {mesh} | {r['per_device_batch']} | "
            f"{'yes' if r['remat'] else 'no'}, {r['grad_accum_steps']} | {peak} | "
            f"{'yes' if r['fits'] else '**no**'} | {step} | {mfu} | {per_image} | "
            f"{'-' if not flops else f'{flops / 1e12:.0f}'} | {coll_text or '-'} | "
            f"{_scan(r)} | {_mb(mem.get('generated_code'))} | {r.get('compile_seconds', 0):.0f} |"
        )
    return "\n".join(lines)


def _row_key(line: str) -> tuple[str, ...]:
    """recipe, slice, mesh, batch per device, remat and accumulation: one row of the table."""
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|")[:5])


def _kept_rows(old_block: str, new_table: str) -> list[str]:
    """Rows of the table in BENCHMARKS.md that this run did not measure again, marked "(old)":
    they show the program of their day (before the MLP kernel, or the attention kernels and
    the TPU's unrolled default; the oldest, with no HBM column, count a loop body's bytes once)."""
    measured = {_row_key(line) for line in new_table.splitlines()[2:]}
    kept = []
    for line in old_block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        header = line.startswith("| recipe") or line.startswith("| ---")
        if not line.startswith("| ") or header or _row_key(line) in measured:
            continue
        if len(cells) == 15 and cells[8].endswith("(old)"):
            kept.append(line)  # kept and marked by an earlier write
        elif len(cells) == 15:
            cells[8] = f"{cells[8]} (old)" if cells[8] != "-" else "-"
            kept.append("| " + " | ".join(cells) + " |")
        elif len(cells) == 14:  # the table before it had the HBM column
            cells[8] = f"{cells[8]} (old)" if cells[8] != "-" else "-"
            kept.append("| " + " | ".join(cells[:9] + ["-"] + cells[9:]) + " |")
    return kept


def write(effort, gpu: bool = False) -> None:
    if gpu:
        write_gpu()
        return
    new_table = table()
    old_block = read_section(SECTION)
    kept = _kept_rows(old_block, new_table)
    note = (
        f"\n\nRows marked (old) were not measured again after the step's program last changed "
        f"(the MLP kernel, 2026-12-02): they show the program of their day (blocks scanned and "
        f"no kernels, or the attention kernels without the MLP's), which moved more bytes, so "
        f"their MFU ceilings read low and most of their peaks high ({len(kept)} rows)."
        if kept
        else ""
    )
    block = (
        f"Made by `python benchmarks/aot_table.py --write-only` from reports of `train.py --aot` "
        f"(compiler effort {effort}), on this repository's 2-core CPU machine, libtpu 0.0.42."
        f"{note}\n\n" + "\n".join([new_table, *kept])
    )
    write_section(SECTION, block, append=True)


def write_gpu() -> None:
    """The GPU rows' own section (the TPU table and its kept rows untouched)."""
    gpu = table(gpu=True)
    if len(gpu.splitlines()) > 2:
        gpu_block = (
            "Made by `python benchmarks/aot_table.py --gpu --write-only` from reports of "
            "`train.py --aot h100:8` and the like (XLA's GPU compiler from jax 0.10.2's CUDA 12 "
            "plugin, on this CPU, without a GPU; `xla_gpu_enable_triton_gemm=false`, nothing "
            "autotuned; HBM traffic counted by `hlo_cost`). A step fits when its peak fits in "
            "JAX's default pool, 75% of the GPU's memory.\n\n" + gpu
        )
        write_section(GPU_SECTION, gpu_block, append=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipes to run (default: every row)")
    parser.add_argument("--effort", type=float, default=-1.0, help="--aot_effort for every row")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md afterwards")
    parser.add_argument("--write-only", action="store_true", help="only rebuild the table")
    parser.add_argument(
        "--gpu", action="store_true", help="the GPU rows (the gpu extra) instead of the TPU rows"
    )
    args = parser.parse_args(argv)
    if not args.write_only:
        rows = [m for m in MATRIX if not args.only or m[0] in args.only]
        rows = [m for m in rows if is_gpu(m[1]) == args.gpu]
        measure(rows, args.effort)
    if args.write or args.write_only:
        write(args.effort, gpu=args.gpu)
    else:
        print(table(gpu=args.gpu))


if __name__ == "__main__":
    main()
