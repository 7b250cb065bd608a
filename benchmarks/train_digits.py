"""Digits training benchmark: MAE pretraining, then finetuning from it, timed end to end.

    python benchmarks/train_digits.py [--workdir runs/bench] [--scratch]

Runs exactly what a user runs (`python train.py` with the digits configs) in subprocesses,
then prints a Markdown table: the MAE train/eval loss at the start and end (the loss must drop),
where the reconstruction PNGs are, the finetune top-1/top-5 on the 360 held-out digits and the
wall-clock time of each stage. The issue's bar: top-1 >= 95% within 15 minutes on 2 CPU cores.
`--scratch` also finetunes the same classifier from random weights, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, workdir: str, extra: list[str]) -> float:
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", config, "--workdir", workdir]
    cmd += extra
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.time() - start


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "bench"))
    parser.add_argument("--scratch", action="store_true", help="also finetune from random init")
    args = parser.parse_args()
    if os.path.exists(args.workdir) and os.listdir(args.workdir):
        sys.exit(f"{args.workdir} is not empty: pick a new --workdir (runs would resume)")
    mae_dir = os.path.join(args.workdir, "digits_mae")
    ft_dir = os.path.join(args.workdir, "digits_finetune")
    mae_time = run(os.path.join(REPO, "configs", "digits_mae.py"), mae_dir, [])
    ft_time = run(
        os.path.join(REPO, "configs", "digits_finetune.py"),
        ft_dir,
        [f"--config.init_from={mae_dir}"],
    )
    mae = records(mae_dir)
    train = [r for r in mae if r["kind"] == "train"]
    evals = [r for r in mae if r["kind"] == "eval"]
    ft = [r for r in records(ft_dir) if r["kind"] == "eval"]
    best = max(ft, key=lambda r: r["top1"])
    rows = [
        (
            "MAE train loss, first logged step -> last",
            f"{train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} (step {train[-1]['step']})",
        ),
        (
            "MAE held-out loss, first eval -> last",
            f"{evals[0]['loss']:.3f} (step {evals[0]['step']}) -> {evals[-1]['loss']:.3f} (step {evals[-1]['step']})",
        ),
        ("MAE wall time (incl. start-up, compile, evals)", f"{mae_time / 60:.1f} min"),
        ("reconstruction pictures", os.path.relpath(os.path.join(mae_dir, "pictures"), REPO)),
        (
            "finetune top-1 / top-5, final (360 held-out digits)",
            f"{ft[-1]['top1'] * 100:.1f}% / {ft[-1]['top5'] * 100:.1f}% (step {ft[-1]['step']})",
        ),
        ("finetune top-1, best eval", f"{best['top1'] * 100:.1f}% (step {best['step']})"),
        ("finetune wall time", f"{ft_time / 60:.1f} min"),
        ("MAE + finetune wall time", f"{(mae_time + ft_time) / 60:.1f} min"),
    ]
    if args.scratch:
        scratch_dir = os.path.join(args.workdir, "digits_scratch")
        scratch_time = run(
            os.path.join(REPO, "configs", "digits_finetune.py"),
            scratch_dir,
            ["--config.init_from="],
        )
        sc = [r for r in records(scratch_dir) if r["kind"] == "eval"]
        rows.append(
            (
                "same finetune from random init: top-1 final / best, wall time",
                f"{sc[-1]['top1'] * 100:.1f}% / {max(r['top1'] for r in sc) * 100:.1f}%, "
                f"{scratch_time / 60:.1f} min",
            )
        )
    print("\n| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
        json.dump(dict(rows), f, indent=2)


if __name__ == "__main__":
    main()
