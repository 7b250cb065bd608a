"""Faults on pods and disks: processes signalled seconds apart stop at one agreed step and save
it; workdirs with glob characters in their path hold restorable checkpoints (and a checkpoint
that cannot be read back is reported at once); one run per workdir; a full disk or a mount
turned read-only mid-run ends in one `error:` line naming the path and the last good checkpoint,
with nothing lost; a resume with changed optimizer settings names them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import train_helpers as th

th.force_cpu_devices()

import jax  # noqa: E402

from hiera_jax.training import checkpoint as checkpoint_lib  # noqa: E402
from hiera_jax.training.checkpoint import CheckpointError  # noqa: E402
from hiera_jax.training.loop import train_and_evaluate  # noqa: E402
from hiera_jax.training.metrics import read_jsonl  # noqa: E402
from hiera_jax.training.workdir_lock import WorkdirInUse, WorkdirLock  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < th.N_DEVICES, reason="needs 8 (simulated) devices set before jax import"
)


def _env(devices: int | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = th.REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = th.xla_flags(devices)
    return env


def _train_cmd(workdir, values: dict, *extra: str) -> list[str]:
    return [
        sys.executable,
        os.path.join(th.REPO, "train.py"),
        "--workdir",
        str(workdir),
        *th.cli_flags(values),
        *extra,
    ]


def _train_steps(workdir) -> list[int]:
    try:
        return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    except (OSError, ValueError):
        return []


def _wait(predicate, procs, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: a run exited early ({p.returncode}):\n{p.stdout.read()}")
        if time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def _one_error_line_last(stderr: str, *needles: str) -> str:
    """The run's stderr ends in one `error:` line holding `needles`, with no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _tiny(workdir, task: str = "mae", **extra):
    values = th.overrides(
        **{"total_steps": 4, "checkpoint_every": 2, "async_checkpoints": False, **extra}
    )
    return train_and_evaluate(th.make_config(task, values), str(workdir), progress=False)


# ============================================================================ preemption
@pytest.mark.parametrize("first, gap", [(0, 3.0), (1, 5.0)], ids=["0-then-1", "1-then-0"])
def test_two_processes_signalled_seconds_apart_stop_together(tmp_path, first, gap):
    """SIGTERM to one process, then seconds later to the other (hosts of a pod hear of a
    preemption at different moments; the late one may find its peer saving or exiting): both
    save the same step and exit 0, and the run resumes from it."""
    values = th.overrides(mesh_shape=(2, 4), total_steps=400, checkpoint_every=0)
    workdir = tmp_path / "pod"
    procs = _two_processes(workdir, values)
    try:
        _wait(lambda: max(_train_steps(workdir), default=0) >= 3, procs, 300, "step 3")
        procs[first].send_signal(signal.SIGTERM)
        time.sleep(gap)
        if procs[1 - first].poll() is None:
            procs[1 - first].send_signal(signal.SIGTERM)
        outs = [out + err for out, err in (p.communicate(timeout=120) for p in procs)]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    agreed = []
    for out in outs:
        found = [ln for ln in out.splitlines() if "every process saves step" in ln]
        assert found, out[-3000:]
        agreed.append(int(found[0].split("saves step")[1].split()[0]))
    assert agreed[0] == agreed[1], agreed
    step = agreed[0]
    assert step < 400
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]
    assert f"Stopped early at step {step}" in outs[0]
    # The saved step restores (here on one process's 8 devices) and training goes on from it.
    summary = _tiny(workdir, mesh_shape=(2, 4), total_steps=step + 2, checkpoint_every=0)
    assert summary["resumed_from"] == step and summary["step"] == step + 2


def _two_processes(workdir, values: dict) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(4)
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return [
        subprocess.Popen(
            _train_cmd(
                workdir,
                values,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=th.REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def test_process_whose_peer_is_killed_ends_with_one_line(tmp_path):
    """Process 1 killed mid-run: process 0, waiting for it in a collective, ends within
    peer_timeout_seconds (not JAX's 100 s heartbeat abort and its thread dumps) with one line
    naming the lost process and the checkpoint to resume from."""
    workdir = tmp_path / "pod"
    values = th.overrides(
        mesh_shape=(2, 4), total_steps=400, checkpoint_every=3, peer_timeout_seconds=10.0
    )
    procs = _two_processes(workdir, values)
    try:
        _wait(lambda: (workdir / "checkpoints" / "3").is_dir(), procs, 300, "checkpoint 3")
        procs[1].kill()
        killed = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode in (2, 3), err[-3000:]  # 2: its collective failed, 3: hung
    line = _one_error_line_last(err, "last good checkpoint", "every process")
    gone = ("process 1 of 2 stopped responding", "another process of this run is gone")
    assert any(g in line for g in gone) and str(workdir / "checkpoints") in line, line
    assert waited < 60, waited


# ============================================================================ odd paths
@pytest.mark.parametrize(
    "name", ["sweep [lr=1e-3] #1", "what? *all*", "unicodé räte 学習", "a]b[c"], ids=range(4)
)
def test_workdir_with_glob_characters_resumes(tmp_path, name):
    workdir = tmp_path / name
    _tiny(workdir, total_steps=2)
    summary = _tiny(workdir, total_steps=4)
    assert summary["resumed_from"] == 2 and summary["step"] == 4


def test_checkpoints_round_trip_under_every_character_but_backslash(tmp_path):
    """Save, read back and restore under a directory named with each ASCII character and some
    unicode: only the backslash fails (so prepare_workdir refuses just that one)."""
    from hiera_jax.training.checkpoint import Checkpointer

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = {"step": jax.numpy.int32(3), "params": {"w": jax.numpy.ones((4, 4))}}
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state
    )
    failed = []
    for char in [chr(i) for i in range(1, 128) if chr(i) != "/"] + ["é", "学", " #1", "%20"]:
        directory = str(tmp_path / f"x{char}y" / "checkpoints")
        try:
            ckpt = Checkpointer(directory, keep=2, async_save=False)
            ckpt.save(3, state, {"step": 3})
            ckpt.close()
            ckpt = Checkpointer(directory, keep=2, async_save=False)
            restored, _ = ckpt.restore(ckpt.latest_step(), abstract)
            ckpt.close()
            assert int(restored["step"]) == 3
        except CheckpointError:
            failed.append(char)
    assert failed == ["\\"], failed


def test_workdir_with_a_backslash_is_refused_before_anything_is_written(tmp_path):
    """The one character whose checkpoints cannot be read back (the test above): refused up
    front, not after a compile and a save."""
    workdir = tmp_path / "run\\1"
    with pytest.raises(ValueError, match="backslash"):
        _tiny(workdir, total_steps=2)
    assert not workdir.exists()


def test_checkpoint_that_cannot_be_read_back_is_reported_at_the_first_save(tmp_path, monkeypatch):
    """The safety net under the glob fix: with etils' unescaped glob put back, orbax writes a
    checkpoint it cannot restore; the run says so at its first save instead of at the resume."""
    from etils.epath import gpath

    monkeypatch.setattr(checkpoint_lib, "escape_glob_in_base_paths", lambda: None)

    def unescaped(self, pattern):
        for found in self._backend.glob(self._PATH.join(self._path_str, pattern)):
            yield self._new(found)

    monkeypatch.setattr(gpath._GPath, "glob", unescaped)
    with pytest.raises(CheckpointError, match="cannot be read back") as err:
        _tiny(tmp_path / "sweep [a]", total_steps=2)
    assert "step 2" in str(err.value) and "--workdir" in str(err.value)


# ============================================================================ one run per workdir
def test_second_run_on_a_workdir_is_refused_and_a_killed_runs_lock_is_stale(tmp_path):
    workdir = tmp_path / "run"
    values = th.overrides(total_steps=100000, checkpoint_every=5)
    first = subprocess.Popen(
        _train_cmd(workdir, values),
        cwd=th.REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait(lambda: len(_train_steps(workdir)) >= 6, [first], 300, "the first run's step 6")
        second = subprocess.run(
            _train_cmd(workdir, values),
            cwd=th.REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = _one_error_line_last(second.stderr, "in use by another run", f"pid {first.pid}")
        assert "--workdir" in line and second.returncode == 2
        assert first.poll() is None, "the first run must go on"
        logged = _train_steps(workdir)
        assert logged == sorted(set(logged)), "two runs wrote one metrics log"
    finally:
        first.kill()
        first.wait()
    assert os.path.exists(workdir / "run.lock")  # SIGKILL: no clean-up ran
    # The dead run's lock is stale: the same command takes it over and resumes.
    third = subprocess.run(
        _train_cmd(workdir, {**values, "total_steps": max(_train_steps(workdir)) + 2}),
        cwd=th.REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stdout and "taking over" in third.stderr
    assert not os.path.exists(workdir / "run.lock")  # released at the end


def test_lock_of_another_host_is_stale_only_when_its_heartbeat_stops(tmp_path):
    path = tmp_path / "run.lock"
    holder = {"run": uuid.uuid4().hex, "host": "elsewhere-7", "pid": 12, "started": "then"}
    path.write_text(json.dumps(holder))
    with pytest.raises(WorkdirInUse, match="pid 12 on elsewhere-7"):
        WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    lock = WorkdirLock(str(tmp_path), heartbeat_seconds=0.05)
    lock.acquire()
    try:
        assert json.loads(path.read_text())["run"] == lock.owner["run"]
        os.utime(path, (old, old))
        time.sleep(0.3)  # the heartbeat keeps it fresh
        assert time.time() - os.path.getmtime(path) < 5
        with pytest.raises(WorkdirInUse, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        lock.release()
    assert not path.exists()


# ============================================================================ disks
def _mount(*args: str) -> None:
    run = subprocess.run(["mount", *args], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(args)}): {run.stderr.strip()}")


@pytest.mark.parametrize("fault", ["full", "lost-mount"])
def test_disk_fault_mid_run_is_one_line_and_loses_nothing(tmp_path, fault):
    """A full disk, or the workdir's mount gone (lazily unmounted while the run writes): one
    error line naming the path and the last good checkpoint; fixed, the same command resumes."""
    disk, workdir = tmp_path / "disk", tmp_path / "mounted"
    disk.mkdir()
    workdir.mkdir()
    _mount("-t", "tmpfs", "-o", "size=80m", "tmpfs", str(disk))
    (disk / "run").mkdir()
    try:
        _mount("--bind", str(disk / "run"), str(workdir))
        values = th.overrides(total_steps=100000, checkpoint_every=5)
        env = _env()
        run = subprocess.Popen(
            _train_cmd(workdir, values),
            cwd=th.REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait(lambda: (workdir / "checkpoints" / "10").is_dir(), [run], 300, "checkpoint 10")
            if fault == "full":
                stat = os.statvfs(disk)
                with open(disk / "filler", "wb") as f, pytest.raises(OSError):
                    f.write(b"\0" * (stat.f_bavail * stat.f_frsize + 2**20))
            else:
                subprocess.run(["umount", "-l", str(workdir)], check=True)
            out, err = run.communicate(timeout=300)
        finally:
            run.kill()
        line = _one_error_line_last(err, str(workdir))
        reason = "no space left" if fault == "full" else "disappeared"
        assert reason in line.lower(), line
        assert run.returncode == 2
        good = sorted(int(n) for n in os.listdir(disk / "run" / "checkpoints") if n.isdigit())
        assert good and f"last good checkpoint is step {good[-1]}" in line, line
        # Fixed, the same command resumes from that checkpoint.
        if fault == "full":
            os.remove(disk / "filler")
        else:
            _mount("--bind", str(disk / "run"), str(workdir))
        again = subprocess.run(
            _train_cmd(workdir, {**values, "total_steps": good[-1] + 2}),
            cwd=th.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {workdir / 'checkpoints'}/{good[-1]}" in again.stdout
    finally:
        subprocess.run(["umount", "-l", str(workdir)], capture_output=True)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ============================================================================ resume settings
def test_changed_optimizer_settings_are_named_not_called_corrupt(tmp_path):
    _tiny(tmp_path, total_steps=2)
    for extra, field in [
        ({"optim__clip_grad_norm": 1.0}, "optim.clip_grad_norm: 0.0 there, 1.0 now"),
        ({"optim__layer_decay": 0.8}, "optim.layer_decay: 1.0 there, 0.8 now"),
        ({"batch_size": 32, "eval_batch_size": 32}, "batch_size: 16 there, 32 now"),
    ]:
        with pytest.raises(CheckpointError) as err:
            _tiny(tmp_path, **extra)
        text = str(err.value)
        assert field in text and "new --workdir" in text, text
        assert "corrupt" not in text and "mv " not in text, text
    # A change that leaves the state's shape alone resumes.
    summary = _tiny(tmp_path, optim__lr=1e-3)
    assert summary["resumed_from"] == 2 and summary["step"] == 4
