"""Stopping a run at a step boundary on SIGTERM (preemption) or Ctrl-C: the same step on every
process, so that every process takes part in the checkpoint that step saves.

One process: a Python handler sets a flag that the loop reads after each step.

Several processes: a flag on one host would stop that host alone, while the others wait for it in
the next step's collective and its save waits for them (a hang). Hosts of a pod or of a SLURM/k8s
job get the signal seconds apart, so the stop step is agreed on through JAX's preemption service:
`jax.distributed.initialize` installs its own SIGTERM handler, which this module leaves in place;
the service then spreads the notice to every process and picks the next step that none has
passed (`multihost_utils.reached_preemption_sync_point`). Ctrl-C is forwarded to it as SIGTERM.
Without the service (`jax_enable_preemption_service=False`) the processes exchange their flags
after every step instead (one small collective per step).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)


def preemption_service_running() -> bool:
    """True when JAX's preemption sync manager runs (multi-process, service enabled)."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None


class StopSignal:
    """`should_stop(step)`, called after every step by every process, is True at the one step
    where all processes stop (after a SIGTERM or Ctrl-C on any of them). A second Ctrl-C on one
    process interrupts it at once."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self.multi_process = jax.process_count() > 1
        self.jax_service = self.multi_process and preemption_service_running()
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if not self.jax_service:  # JAX's own handler takes SIGTERM when its service runs
            self._install(signal.SIGTERM, self._handle)
        self._install(signal.SIGINT, self._handle)

    def _install(self, sig: int, handler) -> None:
        previous = signal.signal(sig, handler)
        self._previous.setdefault(sig, previous)

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt as usual
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.requested:
            return
        self.requested = True
        self.signum = signum
        if self.jax_service:  # hand it to JAX's preemption notifier: every process hears of it
            log.warning(
                "received signal %d: asking every process to stop at the same step and save",
                signum,
            )
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("received signal %d: saving a checkpoint after this step", signum)

    def should_stop(self, step: int) -> bool:
        """After `step`: whether to save this step and stop. Every process must call it after
        every step (the multi-process answer is a collective decision)."""
        if self.jax_service:
            from jax.experimental import multihost_utils

            stop = multihost_utils.reached_preemption_sync_point(step)
        elif self.multi_process:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self.requested))
            stop = bool(np.any(flags))
        else:
            stop = self.requested
        if stop and self.multi_process:
            log.warning(
                "a process was asked to stop (preemption or Ctrl-C): every process saves step %d "
                "and stops",
                step,
            )
            self._ignore_more_signals()
        return stop

    def _ignore_more_signals(self) -> None:
        """Once the stop step is agreed on, later SIGTERMs (other hosts' notices arriving late)
        must not kill a process that is saving or exiting. SIG_IGN, not a Python handler:
        Python puts SIG_DFL back for its own handlers while the interpreter exits, and `restore`
        leaves it (it would put back SIG_DFL too, as Python cannot see JAX's handler)."""
        if threading.current_thread() is threading.main_thread():
            self._previous.pop(signal.SIGTERM, None)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            log.warning("further SIGTERMs are ignored while this process saves and exits")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}
