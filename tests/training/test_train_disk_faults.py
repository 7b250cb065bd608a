"""Faults on disk and in the workdir: any path the OS accepts holds restorable checkpoints or is
refused up front (a checkpoint that cannot be read back is reported at its first save); a full
disk or a lost mount mid-run ends in one `error:` line naming the path and the last good
checkpoint, with nothing lost; a resume with changed optimizer settings names them."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import train as th

th.force_cpu_devices()

import jax  # noqa: E402

from hiera_jax.training import checkpoint as checkpoint_lib  # noqa: E402
from hiera_jax.training.checkpoint import CheckpointError  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < th.N_DEVICES, reason="needs 8 (simulated) devices set before jax import"
)


# ============================================================================ odd paths
def test_workdir_with_glob_characters_resumes(tmp_path):
    """A sweep folder with brackets, `?`, `*`, `#` and unicode in its name (every single
    character is checked on its own below)."""
    workdir = tmp_path / "sweep [lr=1e-3] #1 what? *all* a]b[c räte 学習"
    th.tiny_run(workdir, total_steps=2)
    summary = th.tiny_run(workdir, total_steps=4)
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
        th.tiny_run(workdir, total_steps=2)
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
        th.tiny_run(tmp_path / "sweep [a]", total_steps=2)
    assert "step 2" in str(err.value) and "--workdir" in str(err.value)


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
        env = th.train_env()
        run = subprocess.Popen(
            th.train_command(workdir, values),
            cwd=th.REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            th.wait_for(
                lambda: (workdir / "checkpoints" / "10").is_dir(), [run], 300, "checkpoint 10"
            )
            if fault == "full":
                stat = os.statvfs(disk)
                with open(disk / "filler", "wb") as f, pytest.raises(OSError):
                    f.write(b"\0" * (stat.f_bavail * stat.f_frsize + 2**20))
            else:
                subprocess.run(["umount", "-l", str(workdir)], check=True)
            out, err = run.communicate(timeout=300)
        finally:
            run.kill()
        line = th.assert_error_line_last(err, str(workdir))
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
            th.train_command(workdir, {**values, "total_steps": good[-1] + 2}),
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


@pytest.mark.parametrize("async_save", [False, True])
def test_a_checkpoint_directory_replaced_under_the_run_is_not_written_to(tmp_path, async_save):
    """A lost mount leaves the workdir's path naming the empty directory under it (the test
    above); here the directory is moved away and a new one put at its path, which needs no
    mount. The next save must fail, naming the last good step of the directory the run was
    writing to, rather than go on saving into the new one (before the fix it did: the lost-mount
    run above then trained on instead of stopping, whenever the mount went between two saves)."""
    from hiera_jax.training.checkpoint import Checkpointer

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(str(directory), keep=3, async_save=async_save)
    for step in (5, 10):
        state = {"step": jax.numpy.int32(step), "params": {"w": jax.numpy.ones((4, 4))}}
        ckpt.save(step, jax.device_put(state, device), {"step": step})
    ckpt.wait()
    directory.rename(tmp_path / "elsewhere")
    directory.mkdir()
    with pytest.raises(CheckpointError) as err:
        ckpt.save(15, jax.device_put(state, device), {"step": 15})
    ckpt.close()
    text = str(err.value)
    assert "step 15" in text and "disappeared" in text, text
    assert f"last good checkpoint is step 10 ({directory}/10)" in text, text
    assert os.listdir(directory) == []  # nothing went into the directory now at the path
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["10", "5"]


# ============================================================================ resume settings
def test_changed_optimizer_settings_are_named_not_called_corrupt(tmp_path):
    th.tiny_run(tmp_path, total_steps=2)
    for extra, field in [
        ({"optim__clip_grad_norm": 1.0}, "optim.clip_grad_norm: 0.0 there, 1.0 now"),
        ({"optim__layer_decay": 0.8}, "optim.layer_decay: 1.0 there, 0.8 now"),
        ({"batch_size": 32, "eval_batch_size": 32}, "batch_size: 16 there, 32 now"),
    ]:
        with pytest.raises(CheckpointError) as err:
            th.tiny_run(tmp_path, **extra)
        text = str(err.value)
        assert field in text and "new --workdir" in text, text
        assert "corrupt" not in text and "mv " not in text, text
    # A change that leaves the state's shape alone resumes.
    summary = th.tiny_run(tmp_path, optim__lr=1e-3)
    assert summary["resumed_from"] == 2 and summary["step"] == 4
