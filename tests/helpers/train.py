"""Shared helpers for the training tests (tiny models on the bundled digits, 8 CPU devices)."""

from __future__ import annotations

import os

N_DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={N_DEVICES}"
# The tests' tiny programs spend far longer in XLA's CPU compiler than running, most of it in
# LLVM's optimisation passes: the suite compiles at LLVM -O0 (about half the compile time; the
# TPU compiles of the AOT tests are unaffected, their HLO is the same byte for byte).
# HIERA_TEST_FULL_OPT=1 runs the suite at XLA's default level instead.
FAST_COMPILE = "" if os.environ.get("HIERA_TEST_FULL_OPT") else "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process the tests start: `devices` host devices (None: one, as a user's
    shell has), compiled as the suite compiles."""
    count = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    return " ".join(f for f in (count, FAST_COMPILE) if f)


def force_cpu_devices() -> None:
    """Ask XLA for 8 host devices; must run before jax is first imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = (flags + " " + _FLAG).strip()
    if FAST_COMPILE and "xla_backend_optimization_level" not in flags:
        flags = (flags + " " + FAST_COMPILE).strip()
    os.environ["XLA_FLAGS"] = flags
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# digits_mae / digits_finetune shrunk for CI: a 2-stage Hiera of width 16/32, 1 decoder block,
# batch 16. Keys are dotted config paths; the same dict drives in-process runs and CLI flags.
TINY = {
    "model.embed_dim": 16,
    "model.num_heads": 1,
    "model.decoder_embed_dim": 16,
    "model.decoder_depth": 1,
    "model.decoder_num_heads": 1,
    "batch_size": 16,
    "eval_batch_size": 16,
    "eval_max_examples": 32,
    "total_steps": 6,
    "warmup_steps": 2,
    "log_every": 1,
    "eval_every": -1,
    "checkpoint_every": 0,
    "export_model": False,
    "shard_min_size": 0,
    "num_vis": 0,
    "data.workers": 1,
    "init_from": "",
    # conftest's session-wide cache ("" outside pytest: the run's workdir, as train.py does)
    "compilation_cache_dir": os.environ.get("HIERA_TEST_COMPILATION_CACHE", ""),
}


def overrides(**extra) -> dict:
    """TINY plus `extra` (use `__` for dots: model__embed_dim=8)."""
    return {**TINY, **{k.replace("__", "."): v for k, v in extra.items()}}


def make_config(task: str = "mae", values: dict | None = None):
    """The digits config for `task` with dotted `values` applied."""
    from configs import digits_finetune, digits_mae

    config = (digits_mae if task == "mae" else digits_finetune).get_config()
    return apply_values(config, values if values is not None else TINY)


def tiny_run(workdir, task: str = "mae", **extra) -> dict:
    """`train_and_evaluate` in this process on TINY: 4 steps, a checkpoint every 2 (saved
    synchronously), `extra` overrides on top (`model__embed_dim=32`); its summary."""
    from hiera_jax.training.loop import train_and_evaluate

    base = {"total_steps": 4, "checkpoint_every": 2, "async_checkpoints": False}
    values = overrides(**{**base, **extra})
    return train_and_evaluate(make_config(task, values), str(workdir), progress=False)


def config_file(name: str, values: dict):
    """`configs/<name>.py`'s config with dotted `values` applied."""
    import importlib

    return apply_values(importlib.import_module(f"configs.{name}").get_config(), values)


def apply_values(config, values: dict):
    """`config` with dotted `values` (`model.embed_dim`) set in place; returns it."""
    for dotted, value in values.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def cli_flags(values: dict) -> list[str]:
    """The same overrides as `--config.a.b=value` flags for train.py."""
    out = []
    for key, value in values.items():
        if isinstance(value, tuple):
            value = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        out.append(f"--config.{key}={value}")
    return out


def run_benchmark(*args: str, timeout: int = 600):
    """A benchmarks/ script as a user runs it (one CPU device), which must succeed: its
    CompletedProcess."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    run = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def tpu_compile(fn, args, shardings, device_kind="TPU v5 lite", out_shardings=None) -> str:
    """`fn` traced and compiled for a TPU of `device_kind` (libtpu on this CPU), as optimized HLO
    text. The Pallas kernels size themselves to that chip's VMEM (`tpu.compiling_for`), and a new
    jit is made each call because jit's trace cache ignores the target."""
    import jax

    from hiera_jax.models.kernels import tpu

    with tpu.compiling_for(device_kind):
        return (
            jax.jit(lambda *a: fn(*a), in_shardings=shardings, out_shardings=out_shardings)
            .lower(*args)
            .compile({"exec_time_optimization_effort": -1.0})
            .as_text()
        )


# ---------------------------------------------------------------- train.py in subprocesses
def train_env(devices: int | None = None) -> dict:
    """The environment of a train.py the tests start: this checkout first on the path, the
    suite's compile flags, `devices` host devices (None: one, as a user's shell has)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = xla_flags(devices)
    return env


def train_command(workdir, values: dict, *extra: str) -> list[str]:
    """`python train.py --workdir WORKDIR --config.KEY=VALUE ... EXTRA` (the default config)."""
    import sys

    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        "--workdir",
        str(workdir),
        *cli_flags(values),
        *extra,
    ]


def launch_two_processes(workdir, values: dict, *, merge_output: bool = False) -> list:
    """Two train.py processes of one run, 4 CPU devices each, jax.distributed over localhost
    with gloo collectives; their stdout and stderr are pipes (one pipe with merge_output)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = train_env(4)
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return [
        subprocess.Popen(
            train_command(
                workdir,
                values,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def logged_steps(workdir) -> list[int]:
    """The steps of `workdir/metrics.jsonl` so far ([] while it is missing or being written)."""
    from hiera_jax.training.metrics import read_jsonl

    try:
        return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    except (OSError, ValueError):
        return []


def wait_for(predicate, procs, timeout: float, what: str) -> None:
    """Until `predicate()`; the test fails if one of `procs` exits first or time runs out."""
    import time

    import pytest

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


def assert_error_line_last(stderr: str, *needles: str) -> str:
    """The run's stderr ends in one `error:` line holding `needles`, with no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
