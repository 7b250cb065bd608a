"""Preemption and resume: a run killed with SIGTERM or SIGKILL and restarted with the same command
follows the uninterrupted run's loss trajectory and ends with the same parameters; corrupt
checkpoints are reported, never loaded; the input is a pure function of (seed, step)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import train as th

th.force_cpu_devices()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hiera_jax.training.checkpoint import CheckpointError  # noqa: E402
from hiera_jax.training.inputs import data as data_lib  # noqa: E402
from hiera_jax.training.inputs import pipeline  # noqa: E402
from hiera_jax.training.loop import train_and_evaluate  # noqa: E402
from hiera_jax.training.metrics import read_jsonl  # noqa: E402
from hiera_jax.weights.loading import load_pretrained  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < th.N_DEVICES, reason="needs 8 (simulated) devices set before jax import"
)

STEPS = 150
# One device keeps the three subprocess starts cheap; sharded restores are covered below and in
# test_train_sharding. The in-process reference uses the first of this process's 8 devices.
VALUES = th.overrides(
    total_steps=STEPS,
    warmup_steps=10,
    checkpoint_every=10,
    keep_checkpoints=2,
    export_model=True,
    mesh_shape=(1, 1),
)


def _launch(workdir) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = th.REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = th.xla_flags(1)
    cmd = [
        sys.executable,
        os.path.join(th.REPO, "train.py"),
        "--config",
        os.path.join(th.REPO, "configs", "digits_mae.py"),
        "--workdir",
        str(workdir),
        *th.cli_flags(VALUES),
    ]
    return subprocess.Popen(
        cmd, cwd=th.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _logged_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    try:
        return [r["step"] for r in read_jsonl(path) if r["kind"] == "train"]
    except ValueError:  # a line being written
        return []


def _wait_for_step(proc, workdir, step, checkpoint, timeout=240.0) -> None:
    """Until `step` is logged and checkpoint `checkpoint` is finalised (not a tmp dir)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = os.path.isdir(os.path.join(workdir, "checkpoints", str(checkpoint)))
        if done and max(_logged_steps(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def _losses(workdir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if r["kind"] == "train":
            out.setdefault(r["step"], []).append(r["loss"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, launched exactly like the interrupted ones (XLA's CPU code for a
    1-device process and for one device of an 8-device process may round differently)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = _launch(workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert max(_logged_steps(workdir)) == STEPS
    _, params = load_pretrained(str(workdir / "model"))
    return _losses(workdir), params


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_run_resumes_exactly(sig, tmp_path, reference):
    ref_losses, ref_params = reference
    first = _launch(tmp_path)
    _wait_for_step(first, tmp_path, 15, checkpoint=10)
    first.send_signal(sig)
    out, _ = first.communicate(timeout=240)
    stopped_at = max(_logged_steps(tmp_path))
    assert stopped_at < STEPS, "the run finished before the signal arrived"
    ckpt_dir = tmp_path / "checkpoints"
    if sig == signal.SIGTERM:
        assert first.returncode == 0, out
        assert "Stopped early" in out
        saved = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
        # The run logs a step, then sees the signal and saves that very step before exiting.
        assert saved[-1] == stopped_at, (saved, stopped_at)
    else:
        assert first.returncode == -signal.SIGKILL
        saved = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
        # Killed after logging steps past its last checkpoint: the restart redoes them.
        assert stopped_at > saved[-1], (saved, stopped_at)

    second = _launch(tmp_path)
    out2, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out2
    assert "resumed from" in out2

    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, values in losses.items():
        # One record per step (the killed run's records past the checkpoint were dropped on
        # resume), equal to the uninterrupted run's, bit for bit.
        assert values == ref_losses[step], f"step {step}"
    _, params = load_pretrained(str(tmp_path / "model"))
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_corrupt_checkpoint_is_reported_not_loaded(tmp_path):
    values = th.overrides(
        total_steps=4, checkpoint_every=2, async_checkpoints=False, mesh_shape=(2, 4)
    )
    train_and_evaluate(th.make_config("mae", values), str(tmp_path), progress=False)
    latest = tmp_path / "checkpoints" / "4"
    damaged = 0
    for root, _, files in os.walk(latest / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                size = f.seek(0, 2)
                f.seek(0)
                f.write(os.urandom(max(size, 16)))
                damaged += 1
    assert damaged
    longer = th.make_config("mae", {**values, "total_steps": 6})
    with pytest.raises(CheckpointError, match="cannot be restored"):
        train_and_evaluate(longer, str(tmp_path), progress=False)
    # Moving it away, as the message says, resumes from the previous checkpoint.
    os.rename(latest, str(latest) + ".corrupt")
    summary = train_and_evaluate(longer, str(tmp_path), progress=False)
    assert summary["resumed_from"] == 2 and summary["step"] == 6


def test_batches_are_a_function_of_seed_and_step():
    config = th.make_config("classification", th.overrides(data__mixup=0.8, data__cutmix=1.0))
    source = data_lib.DigitsSource("train")
    transform = data_lib.Transform(config.data, (32, 32), 1, train=True)

    def batches(index=0, count=1):
        return iter(
            pipeline.train_dataset(
                source,
                transform,
                global_batch=16,
                seed=3,
                num_classes=10,
                data_config=config.data,
                with_labels=True,
                process_index=index,
                process_count=count,
            )
        )

    def take(it, n):
        return [next(it) for _ in range(n)]

    a, b = take(batches(), 9), take(batches(), 9)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[7]["image"], a[8]["image"])
    assert a[7]["position"][0] == 7 * 16
    pipeline.check_position(a[7], 7, 16, 0)
    with pytest.raises(RuntimeError, match="batch_size changed"):
        pipeline.check_position(a[7], 6, 16, 0)
    # The grain iterator's saved state resumes at the next batch.
    it = batches()
    take(it, 5)
    state = it.get_state()
    resumed = batches()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], a[5]["image"])
    # Two processes each build their half of the same global batch (before mixing).
    config.data.mixup = config.data.cutmix = 0.0
    whole = take(batches(), 5)[4]
    halves = [take(batches(i, 2), 5)[4] for i in range(2)]
    for key in ("image", "label", "position"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    # One epoch visits every training example once.
    n = len(source) // 16 * 16
    seen = [pipeline.example_index(len(source), 3, p) for p in range(n)]
    assert len(set(seen)) == len(seen)
