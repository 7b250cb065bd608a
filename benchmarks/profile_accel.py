"""Where a train step's device time goes: kernel time by kind, from a `jax.profiler` trace.

Builds the step as `bench_accel.py` does (the in1k recipe), times it, traces a few steps and sums
the accelerator's kernels per step by kind (GEMMs, fusions, reductions, copies and slices).
docs/benchmarks-history.md ("Why the scan is slower on the GPU") has a table from it. One variant per
process, since XLA flags are read at start-up:

    python benchmarks/profile_accel.py --scan off
    python benchmarks/profile_accel.py --scan on
    python benchmarks/profile_accel.py --scan on --keep everything   # the body saves everything
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE \\
        python benchmarks/profile_accel.py --scan on

On a CPU the trace has no device kernels; `--smoke` (tiny at 64x64) only checks the plumbing.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_accel  # noqa: E402
import jax  # noqa: E402

import hiera_jax.models.scan as scan_lib  # noqa: E402

KINDS = (  # first match wins
    ("GEMMs", r"gemm|xmma|sm90|cutlass|cublas|nvjet"),
    ("copies, transposes, DUS", r"copy|dynamic|memcpy|memset|transpose"),
    ("reductions", r"reduc"),
    ("fusions", r"fusion"),
)


def kind_of(kernel: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, kernel, re.I):
            return kind
    return "other"


def kernel_times(trace_dir: str, steps: int) -> dict:
    """Per-step kernel milliseconds by kind and by kernel name, from the perfetto trace that
    `jax.profiler.trace(create_perfetto_trace=True)` wrote under `trace_dir`."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, float] = collections.defaultdict(float)
    count = 0
    for e in events:
        process = processes.get(e.get("pid"), "")
        thread = threads.get((e.get("pid"), e.get("tid")), "")
        on_device = "/device:" in process and "CPU" not in process
        if e.get("ph") != "X" or not on_device or "stream" not in thread.lower():
            continue
        name = re.sub(r"[._]\d+", "", e["name"])[:70]
        by_kind[kind_of(name)] += e["dur"] / 1e3 / steps
        by_name[name] += e["dur"] / 1e3 / steps
        count += 1
    return {
        "kernel_ms": sum(by_kind.values()),
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:15]),
        "kernels_per_step": count // steps,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["classification", "mae"], default="classification")
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--scan", choices=["on", "off"], default="off")
    parser.add_argument(
        "--keep",
        choices=["matmuls", "everything"],
        default="matmuls",
        help="what a scanned body saves for the backward (the library keeps matmul outputs)",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps traced")
    parser.add_argument("--smoke", action="store_true", help="tiny at 64x64, batch 2 (CPU)")
    args = parser.parse_args(argv)
    if args.keep == "everything":
        scan_lib.SAVE_MATMULS = jax.checkpoint_policies.everything_saveable
    size, batch = ("tiny", 2 * jax.device_count()) if args.smoke else (args.size, args.batch)
    config = bench_accel.recipe(args.task, size, batch, args.smoke, args.scan == "on")
    mesh, _, _, _, step = bench_accel.train_runner(config, batch)
    with jax.set_mesh(mesh):
        seconds = bench_accel.timed(step, 1 if args.smoke else 5)
        trace_dir = tempfile.mkdtemp(prefix="profile_accel_")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                jax.block_until_ready(step())
    report = {
        "device": jax.devices()[0].device_kind,
        "task": args.task,
        "model": config.model.name,
        "batch": batch,
        "scan": args.scan,
        "keep": args.keep,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "step_ms": seconds * 1e3,
        **kernel_times(trace_dir, args.steps),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
