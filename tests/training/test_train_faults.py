"""Faults of multi-process runs and of two runs on one workdir: processes signalled seconds apart
stop at one agreed step and save it; a process whose peer is killed ends with one line within a
bounded time; a second run on a live run's workdir is refused in one line, and a killed run's
lock is taken over. Disk faults: test_train_disk_faults.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from helpers import train as th

th.force_cpu_devices()

import jax  # noqa: E402

from hiera_jax.training.workdir_lock import WorkdirInUse, WorkdirLock  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < th.N_DEVICES, reason="needs 8 (simulated) devices set before jax import"
)


# ============================================================================ preemption
@pytest.mark.parametrize("first, gap", [(0, 3.0), (1, 5.0)], ids=["0-then-1", "1-then-0"])
def test_two_processes_signalled_seconds_apart_stop_together(tmp_path, first, gap):
    """SIGTERM to one process, then seconds later to the other (hosts of a pod hear of a
    preemption at different moments; the late one may find its peer saving or exiting): both
    save the same step and exit 0, and the run resumes from it."""
    values = th.overrides(mesh_shape=(2, 4), total_steps=400, checkpoint_every=0)
    workdir = tmp_path / "pod"
    procs = th.launch_two_processes(workdir, values)
    try:
        th.wait_for(lambda: max(th.logged_steps(workdir), default=0) >= 3, procs, 300, "step 3")
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
    summary = th.tiny_run(workdir, mesh_shape=(2, 4), total_steps=step + 2, checkpoint_every=0)
    assert summary["resumed_from"] == step and summary["step"] == step + 2


def test_process_whose_peer_is_killed_ends_with_one_line(tmp_path):
    """Process 1 killed mid-run: process 0, waiting for it in a collective, ends within
    peer_timeout_seconds (not JAX's 100 s heartbeat abort and its thread dumps) with one line
    naming the lost process and the checkpoint to resume from."""
    workdir = tmp_path / "pod"
    values = th.overrides(
        mesh_shape=(2, 4), total_steps=400, checkpoint_every=3, peer_timeout_seconds=10.0
    )
    procs = th.launch_two_processes(workdir, values)
    try:
        th.wait_for(lambda: (workdir / "checkpoints" / "3").is_dir(), procs, 300, "checkpoint 3")
        procs[1].kill()
        killed = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode in (2, 3), err[-3000:]  # 2: its collective failed, 3: hung
    line = th.assert_error_line_last(err, "last good checkpoint", "every process")
    gone = ("process 1 of 2 stopped responding", "another process of this run is gone")
    assert any(g in line for g in gone) and str(workdir / "checkpoints") in line, line
    assert waited < 60, waited


# ============================================================================ one run per workdir
def test_second_run_on_a_workdir_is_refused_and_a_killed_runs_lock_is_stale(tmp_path):
    workdir = tmp_path / "run"
    values = th.overrides(total_steps=100000, checkpoint_every=5)
    first = subprocess.Popen(
        th.train_command(workdir, values),
        cwd=th.REPO,
        env=th.train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        th.wait_for(
            lambda: len(th.logged_steps(workdir)) >= 6, [first], 300, "the first run's step 6"
        )
        second = subprocess.run(
            th.train_command(workdir, values),
            cwd=th.REPO,
            env=th.train_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = th.assert_error_line_last(second.stderr, "in use by another run", f"pid {first.pid}")
        assert "--workdir" in line and second.returncode == 2
        assert first.poll() is None, "the first run must go on"
        logged = th.logged_steps(workdir)
        assert logged == sorted(set(logged)), "two runs wrote one metrics log"
    finally:
        first.kill()
        first.wait()
    assert os.path.exists(workdir / "run.lock")  # SIGKILL: no clean-up ran
    # The dead run's lock is stale: the same command takes it over and resumes.
    third = subprocess.run(
        th.train_command(workdir, {**values, "total_steps": max(th.logged_steps(workdir)) + 2}),
        cwd=th.REPO,
        env=th.train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stdout and "taking over" in third.stderr
    # The compile is announced before it starts, not only timed after it.
    assert third.stdout.index("compiling the train step") < third.stdout.index("first step took")
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
