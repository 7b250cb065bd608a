"""Keep the command line's last word ours: when a run fails, `train.py` prints one `error:` line,
and the libraries underneath must not bury it in tracebacks they print on their own.

Two sources do: orbax logs every failed background write at ERROR level with its traceback (a
full disk gives hundreds of lines, several times over), and TensorStore, whose writes finish after
orbax has closed the asyncio loop that awaited them, prints "RuntimeError: Event loop is closed"
through `sys.excepthook` for each one, up to the process's exit; at exit asyncio logs the
failed writes nobody awaited any more. They say nothing the error line
does not (the failure reaches the run as an exception, and becomes that line); `--verbose` keeps
them.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings


def _closed_loop(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "orbax" in record.pathname.replace("\\", "/").split("/")
        if from_orbax and record.levelno >= logging.ERROR:
            return False
        # asyncio, when the loops of a failed save are collected at exit
        return "exception was never retrieved" not in str(record.msg)


def quiet_library_noise() -> None:
    """Drop orbax's error logs and the closed-loop tracebacks (process-wide; idempotent)."""
    if getattr(sys.excepthook, "drops_closed_loop", False):
        return
    previous_hook, previous_thread_hook = sys.excepthook, threading.excepthook
    previous_unraisable = sys.unraisablehook

    def excepthook(kind, value, tb):
        if not _closed_loop(value):
            previous_hook(kind, value, tb)

    def thread_hook(args):
        if not _closed_loop(args.exc_value):
            previous_thread_hook(args)

    def unraisable_hook(args):
        if not _closed_loop(args.exc_value):
            previous_unraisable(args)

    excepthook.drops_closed_loop = True
    sys.excepthook, threading.excepthook = excepthook, thread_hook
    sys.unraisablehook = unraisable_hook
    warnings.filterwarnings(
        "ignore", message="coroutine .* was never awaited", category=RuntimeWarning
    )
    drop = _DropOrbaxErrors()
    for logger in (logging.getLogger(), logging.getLogger("absl"), logging.getLogger("asyncio")):
        logger.addFilter(drop)
        for handler in logger.handlers:
            handler.addFilter(drop)
