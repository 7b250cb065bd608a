"""The accelerator benchmark runs end to end (here on the CPU, in its --smoke mode)."""

import gzip
import json
import os
import sys

from helpers import train as th


def test_bench_accel_smoke(tmp_path):
    out = tmp_path / "rows.json"
    run = th.run_benchmark("benchmarks/bench_accel.py", "--smoke", "--json", str(out))
    rows = json.load(open(out))["rows"]
    assert [r["case"] for r in rows] == ["inference", "finetune step", "MAE step"]
    for row in rows:
        assert row["seconds"] > 0 and row["images_per_sec"] > 0
        assert row["flops"] > 0  # XLA's count: MFU is flops / time / peak where the peak is known
        assert row["mfu"] is None  # a CPU has no published bf16 peak
    # A training step costs about 3 forwards (same batch, same input size).
    assert 2.0 < rows[1]["flops"] / rows[0]["flops"] < 4.0
    assert "| MAE step | mae_hiera_tiny_224 |" in run.stdout


def _trace(path, events):
    """A perfetto trace as `jax.profiler.trace(create_perfetto_trace=True)` writes it."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #14"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 3, "args": {"name": "python"}},
    ]
    os.makedirs(path / "plugins" / "profile" / "run")
    with gzip.open(path / "plugins" / "profile" / "run" / "h.perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_profile_accel_sums_device_kernels_per_step_by_kind(tmp_path):
    sys.path.insert(0, os.path.join(th.REPO, "benchmarks"))
    import profile_accel

    def kernel(name, us, pid=1, tid=7):
        return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": 0, "dur": us}

    _trace(
        tmp_path,
        [
            kernel("nvjet_sm90_tst_h_bz_NNT", 3000),
            kernel("gemm_fusion_dot.12", 1000),
            kernel("memcpy128", 500),
            kernel("loop_dynamic_update_slice_fusion.3", 500),
            kernel("input_add_reduce_fusion.7", 800),
            kernel("loop_multiply_fusion", 600),
            kernel("some_kernel", 200),
            kernel("fusion.1", 99000, pid=2, tid=3),  # host thread: not device time
        ],
    )
    report = profile_accel.kernel_times(str(tmp_path), steps=2)
    assert report["by_kind"] == {
        "GEMMs": 2.0,
        "copies, transposes, DUS": 0.5,
        "reductions": 0.4,
        "fusions": 0.3,
        "other": 0.1,
    }
    assert report["kernel_ms"] == 3.3 and report["kernels_per_step"] == 3
    assert report["top"]["loop_dynamic_update_slice_fusion"] == 0.25  # numbering merged


def test_profile_accel_smoke():
    """The profiler script runs end to end on the CPU (whose trace has no device kernels)."""
    run = th.run_benchmark("benchmarks/profile_accel.py", "--smoke", "--scan", "on", "--steps", "1")
    report = json.loads(run.stdout[run.stdout.index("{") :])
    assert report["model"] == "hiera_tiny_224" and report["scan"] == "on"
    assert report["step_ms"] > 0 and report["kernel_ms"] == 0  # no accelerator here
