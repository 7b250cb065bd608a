"""Test set-up shared by every test module.

Eight simulated CPU devices, so sharding tests see a small "pod"; this must happen before jax is
imported anywhere, which is why it lives here.
"""

import glob
import os
import shutil
import tempfile

from helpers import train as th

# The dev extra installs libtpu (for the ahead-of-time TPU compiles); without JAX_PLATFORMS=cpu
# JAX would try to start a TPU runtime in every process and log libtpu's warnings. Compile-only
# TPU devices (`jax.experimental.topologies`) still work. Also the suite's CPU compile level
# (helpers.train.FAST_COMPILE).
th.force_cpu_devices()
# One JAX compilation cache for every train.py the tests start (train.py's
# --config.compilation_cache_dir): runs of the same tiny program compile it once per session,
# not once per run. Made here, before pytest-xdist starts its workers, so they share it too.
_OWN_CACHE = "HIERA_TEST_COMPILATION_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["HIERA_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="hiera_jax_test_jit_")

import pytest  # noqa: E402

_PARITY: list[tuple[str, str, str, float]] = []


@pytest.fixture
def record_parity():
    """Log a measured parity error; `HIERA_PARITY_REPORT=path` writes them all as a table."""

    def record(model: str, source: str, quantity: str, error: float) -> float:
        _PARITY.append((model, source, quantity, error))
        return error

    return record


def pytest_sessionfinish(session):
    """Drop the session's compilation cache and write the parity table. Under pytest-xdist each
    worker writes its rows to `path.<worker>` and the controller, which finishes last, merges
    them into `path`."""
    if _OWN_CACHE:  # the controller's, or a worker's that was started without it
        shutil.rmtree(os.environ["HIERA_TEST_COMPILATION_CACHE"], ignore_errors=True)
    path = os.environ.get("HIERA_PARITY_REPORT")
    if not path:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        with open(f"{path}.{worker}", "w") as f:
            f.writelines("\t".join(map(str, row)) + "\n" for row in _PARITY)
        return
    rows = list(_PARITY)
    for part in sorted(glob.glob(glob.escape(path) + ".gw*")):
        with open(part) as f:
            rows += [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]
        os.remove(part)
    if not rows:
        return
    lines = [
        "| model | weights from | output | relative error |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {m} | {s} | {q} | {float(e):.1e} |" for m, s, q, e in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
