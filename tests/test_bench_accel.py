"""The accelerator benchmark runs end to end (here on the CPU, in its --smoke mode)."""

import json
import os
import subprocess
import sys

import train_helpers as th


def test_bench_accel_smoke(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_accel.py", "--smoke", "--json", str(out)],
        cwd=th.REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.load(open(out))["rows"]
    assert [r["case"] for r in rows] == ["inference", "finetune step", "MAE step"]
    for row in rows:
        assert row["seconds"] > 0 and row["images_per_sec"] > 0
        assert row["flops"] > 0  # XLA's count: MFU is flops / time / peak where the peak is known
        assert row["mfu"] is None  # a CPU has no published bf16 peak
    # A training step costs about 3 forwards (same batch, same input size).
    assert 2.0 < rows[1]["flops"] / rows[0]["flops"] < 4.0
    assert "| MAE step | mae_hiera_tiny_224 |" in run.stdout
