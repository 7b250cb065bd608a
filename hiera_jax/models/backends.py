"""Starting JAX's backends without the plugins' noise on a machine that lacks their chips.

With jax's CUDA plugin or libtpu installed (the `gpu` / `tpu` extras, and so the dev venv),
starting the backends on a CPU-only machine prints a CUDA traceback and five libtpu error lines
before the first line of ours, though JAX then runs on the CPU as it should. The command lines
start the backends through `start_quietly`: where JAX ends up on the CPU, the plugins' text
becomes one line; where it finds a GPU or TPU, their text is shown as it was. Which platform
runs is JAX's choice either way; nothing here picks one.
"""

from __future__ import annotations

import os
import sys
import tempfile

# What the plugins print when they find no chip: jax's CUDA plugin, libtpu.
_PLUGINS = {"cuda": ("xla_cuda", "CUDA"), "tpu": ("libtpu", "TPU")}


def start_quietly(verbose: bool = False) -> str:
    """Start JAX's backends (`jax.default_backend()`) and return the platform.

    Their stderr is held back while they start: shown as it was if a GPU or TPU came up (or
    `verbose`, or `JAX_PLATFORMS` is set), else replaced by one `note:` line naming the plugins
    that found no device."""
    import jax

    if verbose or os.environ.get("JAX_PLATFORMS"):
        return jax.default_backend()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            platform = jax.default_backend()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        text = held.read().decode(errors="replace")
    silent = [name for name, marks in _PLUGINS.items() if any(m in text for m in marks)]
    if platform != "cpu" or not silent:
        sys.stderr.write(text)
    else:
        print(
            f"note: jax's {' and '.join(silent)} plugin{'s' if len(silent) > 1 else ''} found no "
            "device; running on the CPU (JAX_PLATFORMS=cpu skips the plugins, --verbose shows "
            "what they printed)",
            file=sys.stderr,
        )
    sys.stderr.flush()
    return platform
