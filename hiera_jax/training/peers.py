"""A process whose peers are gone ends with one line, within a bounded time.

When one process of a multi-process run dies (killed, its host lost), the others wait for it in
the next collective. JAX's coordination service notices only when the dead process misses its
heartbeats (100 s by default), and then aborts the survivors with a fatal log and hundreds of
lines of thread dumps. Here each process posts a counter to the coordination service's key-value
store every few seconds from a thread; a peer whose counter stops for `timeout` seconds, or a
coordinator that stops answering, ends this process with one `error:` line that says where the
run can resume, before JAX's abort would.

When the coordinator process itself (process 0) dies, the survivors' connections close and
JAX's client aborts them at once, with its own log: its error callback cannot be replaced from
Python (jaxlib 0.10.2 cannot pass the status to a Python callable).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeersLost(RuntimeError):
    """A collective failed because another process of the run is gone."""


PREFIX = "hiera_jax/alive/"
DONE = "done"


class PeerWatch:
    """The watching thread of one process (nothing runs in a single-process run)."""

    def __init__(
        self,
        describe_resume: Callable[[], str],
        *,
        interval: float = 2.0,
        timeout: float = 60.0,
    ):
        import jax
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.index, self.count = jax.process_index(), jax.process_count()
        self.describe_resume = describe_resume
        self.interval, self.timeout = interval, timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.client is not None and self.count > 1

    def start(self) -> PeerWatch:
        if self.active:
            self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self, finished: bool = True) -> None:
        """Stop watching; `finished`: tell the peers this process ends on purpose (after an error
        it does not, so that theirs end too instead of waiting for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            if not finished:
                return
            try:
                self.client.key_value_set(f"{PREFIX}{self.index}", DONE, allow_overwrite=True)
            except Exception as err:  # noqa: BLE001 - the coordinator may be shutting down
                log.debug("could not post the end of this process: %s", err)

    def _run(self) -> None:
        start = time.monotonic()
        seen = {j: (None, start) for j in range(self.count) if j != self.index}
        coordinator_ok = start
        beat = 0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                beat += 1
                self.client.key_value_set(f"{PREFIX}{self.index}", str(beat), allow_overwrite=True)
                for j, (value, since) in seen.items():
                    try:
                        current = self.client.key_value_try_get(f"{PREFIX}{j}")
                    except Exception:  # noqa: BLE001 - not posted yet
                        current = None
                    if current == DONE:
                        continue
                    if current != value:
                        seen[j] = (current, now)
                    elif now - since > self.timeout:
                        self._lost(f"process {j} of {self.count} stopped responding")
                coordinator_ok = now
            except Exception as err:  # noqa: BLE001 - the coordination service is gone
                if now - coordinator_ok > self.timeout:
                    self._lost(f"the run's coordinator (process 0) stopped answering ({err})")

    def _lost(self, what: str) -> None:
        if self._stop.is_set():
            return
        try:
            resume = self.describe_resume()
        except Exception:  # noqa: BLE001
            resume = ""
        resume = resume[:1].upper() + resume[1:] if resume else "Rerun every process to resume"
        sys.stdout.flush()
        sys.stderr.write(
            f"error: {what} for over {self.timeout:.0f} s; process {self.index} stops too. "
            f"{resume}\n"
        )
        sys.stderr.flush()
        os._exit(3)  # the main thread may be blocked in a collective that never returns
