"""Every user error of `train.py` ends in one clear line and exit status 2, creates nothing it
should not, and loses nothing; a resumed run's metrics log holds one record per step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import train as th

th.force_cpu_devices()

from hiera_jax.training import config as config_lib  # noqa: E402
from hiera_jax.training.checkpoint import CheckpointError  # noqa: E402
from hiera_jax.training.loop import train_and_evaluate  # noqa: E402
from hiera_jax.training.metrics import read_jsonl  # noqa: E402


def train_cli(*args, workdir=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", *args]
    if workdir is not None:
        command += ["--workdir", str(workdir)]
    env = {**os.environ, "XLA_FLAGS": th.xla_flags()}  # one CPU device, as a user's shell has
    return subprocess.run(
        command, cwd=th.REPO, capture_output=True, text=True, env=env, timeout=300
    )


def assert_one_line_error(run: subprocess.CompletedProcess, *needles: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, run.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# (flags, words the one line must hold); every case is refused before a workdir is created.
CLI_CASES = [
    (["--config.foo=1"], ["--config.foo: no such config key", "batch_size", "total_steps"]),
    (["--config.batchsize=3"], ["Did you mean --config.batch_size"]),
    (["--config.model.embeddim=8"], ["Did you mean --config.model.embed_dim", "Keys under model"]),
    (["--config.optim.learning_rate=1"], ["no such config key", "Keys under optim", "lr"]),
    (["--config", "configs/nope.py"], ["no such config file", "digits_mae.py"]),
    (["--config", "configs/in1k_mae.py:gigantic"], ["size must be one of"]),
    (["--config.batch_size=0"], ["batch_size=0 is out of range", ">= 1"]),
    (["--config.total_steps=-5"], ["total_steps=-5 is out of range"]),
    (["--config.num_epochs=-1"], ["num_epochs=-1.0 is out of range"]),
    (["--config.total_steps=0", "--config.num_epochs=0"], ["total_steps or --config.num_epochs"]),
    (["--config.warmup_steps=-1"], ["warmup_steps=-1 is out of range"]),
    (["--config.log_every=0"], ["log_every=0 is out of range"]),
    (["--config.eval_batch_size=-8"], ["eval_batch_size=-8 is out of range"]),
    (["--config.grad_accum_steps=0"], ["grad_accum_steps=0 is out of range"]),
    (["--config.keep_checkpoints=0"], ["keep_checkpoints=0 is out of range"]),
    (["--config.model.mask_ratio=1.5"], ["mask_ratio=1.5 is out of range", "[0, 1)"]),
    (["--config.model.drop_path_rate=-0.1"], ["drop_path_rate=-0.1 is out of range"]),
    (["--config.optim.lr=0"], ["optim.lr=0.0 is out of range"]),
    (["--config.optim.b2=1.0"], ["optim.b2=1.0 is out of range"]),
    (["--config.label_smoothing=1.0"], ["label_smoothing=1.0 is out of range"]),
    (["--config.data.crop_scale=(0.9,0.2)"], ["crop_scale=(0.9, 0.2) must be (low, high)"]),
    (["--config.data.repeated_aug=0"], ["repeated_aug=0 is out of range"]),
    (["--config.batch_size=12", "--config.grad_accum_steps=5"], ["multiple of grad_accum_steps"]),
    (["--config.model.name=hiera_nope_224"], ["hiera_nope_224"]),
    (["--config.model.input_size=(0,0)"], ["input_size"]),
    (["--aot_slices=0", "--aot", "v5e:2x2"], ["--aot_slices must be >= 1"]),
    (["--aot_effort=3", "--aot", "v5e:2x2"], ["--aot_effort must be in [-1, 1]"]),
]


@pytest.mark.parametrize("flags, needles", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_command_line_is_one_line_and_creates_nothing(tmp_path, flags, needles):
    workdir = tmp_path / "run"
    run = train_cli(*flags, workdir=workdir)
    assert_one_line_error(run, *needles)
    assert not workdir.exists(), "a refused command must leave no workdir behind"


def test_verbose_shows_the_traceback(tmp_path):
    run = train_cli("--config.batch_size=0", "--verbose", workdir=tmp_path / "run")
    assert run.returncode != 0 and "Traceback" in run.stderr


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("my notes")
    line = assert_one_line_error(train_cli(workdir=path), "is a file", "--workdir")
    assert "workdir" in line and path.read_text() == "my notes"  # nothing lost


def test_workdir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(train_cli(workdir=blocker / "run"), "workdir", "not writable")


def test_full_disk_is_refused_before_compiling(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(OSError, match="MiB free and checkpoints of this run need"):
        train_and_evaluate(th.make_config("mae"), str(tmp_path), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_model_name_from_the_command_line_on_every_config():
    """--config.model.name picks any registry model; the recipe's model keys apply on top."""
    for path, arg in [("configs/in1k_mae.py", "base"), ("configs/k400_finetune.py", "large")]:
        config = config_lib.load_config_file(os.path.join(th.REPO, path) + f":{arg}")
        kind = "mae_" if "mae" in path else ""
        suffix = "16x224" if "k400" in path else "224"
        config.model.name = f"{kind}hiera_huge_{suffix}"
        model = config_lib.resolve_model_config(config)
        assert model.embed_dim == 256  # huge's width
        assert model.dtype == "bfloat16" and model.drop_path_rate == config.model.drop_path_rate


def test_checkpoint_of_another_run_says_so(tmp_path):
    th.tiny_run(tmp_path)
    with pytest.raises(CheckpointError, match="belongs to another run") as err:
        th.tiny_run(tmp_path, task="classification")
    assert "new --workdir" in str(err.value) and "task" in str(err.value)
    with pytest.raises(CheckpointError, match="belongs to another run") as err:
        th.tiny_run(tmp_path, total_steps=6, model__embed_dim=32)
    assert "embed_dim: 16 there, 32 now" in str(err.value)
    # How it computes may change on resume: remat and dtype are not another run.
    summary = th.tiny_run(tmp_path, total_steps=6, model__remat=True)
    assert summary["resumed_from"] == 4 and summary["step"] == 6


def test_corrupt_checkpoint_and_input_state_are_one_line(tmp_path):
    th.tiny_run(tmp_path)
    state_file = tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json"
    assert state_file.exists()
    state_file.write_text("{ not json")
    run = train_cli(
        "--config",
        "configs/digits_mae.py",
        *th.cli_flags(th.overrides(total_steps=6, checkpoint_every=2)),
        workdir=tmp_path,
    )
    line = assert_one_line_error(run, "input pipeline state", "cannot be restored", "mv ")
    assert len(line) < 800
    assert state_file.exists()  # reported, not deleted

    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.write(os.urandom(64))
    run = train_cli(
        "--config",
        "configs/digits_mae.py",
        *th.cli_flags(th.overrides(total_steps=6, checkpoint_every=2)),
        workdir=tmp_path,
    )
    line = assert_one_line_error(run, "cannot be restored", "Move it away")
    assert len(line) < 1200, line


def test_resumed_run_logs_each_step_once(tmp_path):
    th.tiny_run(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed after logging step 4
    summary = th.tiny_run(tmp_path)
    assert summary["resumed_from"] == 2
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4], steps


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    th.tiny_run(tmp_path)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # killed mid-write
    th.tiny_run(tmp_path, total_steps=6)
    records = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
