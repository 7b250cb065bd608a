"""The GPU side-by-side benchmark (ours vs the official PyTorch Hiera vs timm's) runs end to end
on the CPU in its --smoke mode, so it is ready when a GPU is lent."""

import hashlib
import json
import os
import sys

import pytest
from helpers import train as th

sys.path.insert(0, os.path.join(th.REPO, "benchmarks"))
import bench_gpu_vs_torch as bench  # noqa: E402

MEASURED = {  # (case, implementation, mode) the smoke run times: eager only, no timm MAE
    ("inference", "ours", "jax fp32"),
    ("inference", "official", "torch fp32 eager"),
    ("inference", "timm", "torch fp32 eager"),
    ("finetune step", "ours", "jax fp32"),
    ("finetune step", "official", "torch fp32 eager"),
    ("finetune step", "timm", "torch fp32 eager"),
    ("MAE step", "ours", "jax fp32"),
    ("MAE step", "official", "torch fp32 eager"),
}


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run shared by the tests: (rows, stdout); BENCHMARKS.md must be left alone."""
    out = tmp_path_factory.mktemp("gpu_vs_torch") / "rows.json"
    benchmarks_md = os.path.join(th.REPO, "BENCHMARKS.md")
    before = _digest(benchmarks_md)
    run = th.run_benchmark(
        "benchmarks/bench_gpu_vs_torch.py", "--smoke", "--json", str(out), timeout=400
    )
    assert _digest(benchmarks_md) == before
    return json.load(open(out))["rows"], run.stdout


def test_smoke_measures_every_case_and_implementation(smoke):
    rows, _ = smoke
    measured = [r for r in rows if r["seconds"] is not None]
    assert {(r["case"], r["impl"], r["mode"]) for r in measured} == MEASURED
    assert len(measured) == len(MEASURED)
    for r in measured:
        assert r["seconds"] > 0 and r["images_per_sec"] > 0, r
        assert r["images_per_sec"] == pytest.approx(r["batch"] / r["seconds"])
        assert r["mfu"] is None  # a CPU has no published bf16 peak
        assert not r.get("error"), r
    # timm has no MAE Hiera: no row at all, not even a skipped one.
    assert not [r for r in rows if r["case"] == "MAE step" and r["impl"] == "timm"]


def test_smoke_rows_of_a_case_share_batch_and_flops(smoke):
    rows, _ = smoke
    flops = {}
    for case in ("inference", "finetune step", "MAE step"):
        of_case = [r for r in rows if r["case"] == case]
        assert {r["batch"] for r in of_case} == {2}
        assert len({r["flops"] for r in of_case}) == 1  # ours' count, for every row
        flops[case] = of_case[0]["flops"]
        assert flops[case] > 0
        ours = next(r for r in of_case if r["impl"] == "ours")
        for r in of_case:  # the ratio column: our images/s over this row's
            if r["impl"] != "ours" and r["seconds"]:
                assert r["vs_ours"] == pytest.approx(ours["images_per_sec"] / r["images_per_sec"])
    # A training step costs about 3 forwards (same batch, same input size).
    assert 2.0 < flops["finetune step"] / flops["inference"] < 4.0


def test_smoke_lists_compile_rows_as_skipped(smoke):
    rows, stdout = smoke
    compiled = [r for r in rows if r["compile"]]
    assert {(r["case"], r["impl"]) for r in compiled} == {
        ("inference", "official"),
        ("inference", "timm"),
        ("finetune step", "official"),
        ("finetune step", "timm"),
        ("MAE step", "official"),
    }
    for r in compiled:
        assert r["seconds"] is None and r["skipped"] == bench.SMOKE_COMPILE
        assert r["mode"] == "torch fp32 + torch.compile"
    # The printed table has every row, measured or skipped.
    assert stdout.count("| skipped: torch.compile is not run in --smoke (CPU) |") == 5
    for case, impl, mode in MEASURED:
        model = "mae_hiera_tiny_224" if case == "MAE step" else "hiera_tiny_224"
        assert f"| {case} | {model} | {bench.IMPL_NAMES[impl]} | 2 | {mode} | " in stdout
    assert "torch 2" in stdout and "hiera-transformer" in stdout  # the versions header


def test_case_flops_counts_what_ours_counts(smoke):
    """Without our row (`--impls official timm`), the FLOPs come from shapes alone: the same count."""
    rows, _ = smoke
    ours = next(r for r in rows if r["case"] == "inference" and r["impl"] == "ours")
    assert bench.case_flops("inference", "tiny", 2, smoke=True) == ours["flops"]


def test_table_ratio_mfu_and_reasons(monkeypatch):
    monkeypatch.setattr(bench.jax, "device_count", lambda: 1)  # the script runs on one device
    base = {"model": "hiera_base_224", "batch": 256, "case": "finetune step"}
    ours = {**base, "impl": "ours", "mode": "jax bf16", "seconds": 0.1}
    timm = {**base, "impl": "timm", "mode": "torch bf16 autocast eager", "seconds": 0.2}
    broken = {**base, "impl": "official", "mode": "torch bf16 autocast + torch.compile"}
    broken["seconds"], broken["error"] = None, "RuntimeError: a | b"
    late = {**base, "impl": "timm", "mode": "torch bf16 autocast + torch.compile", "seconds": None}
    late["skipped"] = "past --budget 480 s"
    rows = [bench.finish_row(r, None, 10e12, 200e12) for r in (ours,)]
    rows += [bench.finish_row(r, rows[0], 10e12, 200e12) for r in (timm, broken, late)]
    assert rows[1]["vs_ours"] == pytest.approx(2.0) and rows[1]["mfu"] == pytest.approx(0.25)
    text = bench.table(rows, "Device: test")
    lines = text.splitlines()
    assert lines[0] == "Device: test"
    assert (
        "| finetune step | hiera_base_224 | ours (hiera-jax) | 256 | jax bf16 | 100.0 | 2,560 "
        "| 50.0% | - |" in lines
    )
    assert (
        "| finetune step | hiera_base_224 | timm (SDPA) | 256 | torch bf16 autocast eager | 200.0 "
        "| 1,280 | 25.0% | 2.00x |" in lines
    )
    assert any(line.endswith("| - | - | - | failed: RuntimeError: a \\| b |") for line in lines)
    assert any(line.endswith("| skipped: past --budget 480 s |") for line in lines)


def test_smoke_refuses_to_write_benchmarks():
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--write"])
