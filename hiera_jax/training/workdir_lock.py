"""One run per workdir: `workdir/run.lock`, held from before the first write to after the last.

Two runs on one workdir overwrite each other's checkpoints and interleave their metrics, and one
of them dies deep inside orbax. The lock is a file created with O_EXCL (atomic on local disks and
NFSv4) holding who runs: host, pid, start time and command. Process 0 of a run takes it for all
of the run's processes (they share the workdir on a shared filesystem), and a heartbeat thread
touches it while the run lives. It is stale, and taken over with a warning, when its process is
gone (same host) or its heartbeat stopped (another host, or a filesystem where pids are not
comparable): a crash or SIGKILL never leaves a workdir locked for good.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0  # a lock whose heartbeat is this old belongs to a dead run


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WorkdirLock:
    def __init__(
        self,
        workdir: str,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_seconds: float = STALE_SECONDS,
    ):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self.owner = {
            "run": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        """Take the lock, or raise WorkdirInUse naming the run that holds it."""
        for _ in range(3):
            if self._create():
                break
            holder = self._read()
            if holder is None:  # being written by a run starting this moment, or torn
                time.sleep(0.2)
                holder = self._read()
                if holder is None and not os.path.exists(self.path):
                    continue  # released meanwhile: create it again
            why_stale = self._stale(holder)
            if why_stale is None:
                raise WorkdirInUse(self._in_use_message(holder))
            log.warning("taking over %s: %s", self.path, why_stale)
            self._replace()
            time.sleep(0.1)  # two runs taking over at the same moment: the last write wins
            break
        if (self._read() or {}).get("run") != self.owner["run"]:
            raise WorkdirInUse(self._in_use_message(self._read()))
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.held:
            return
        self.held = False
        try:
            if (self._read() or {}).get("run") == self.owner["run"]:
                os.remove(self.path)
        except OSError as err:  # a lost mount at exit: the next run finds the lock stale
            log.warning("could not remove %s: %s", self.path, err)

    # ------------------------------------------------------------------ internals
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _replace(self) -> None:
        tmp = f"{self.path}.{self.owner['run']}"
        with open(tmp, "w") as f:
            json.dump(self.owner, f)
        os.replace(tmp, self.path)

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            holder["_age"] = time.time() - os.path.getmtime(self.path)
            return holder
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> str | None:
        """Why the lock `holder` describes is stale, or None when its run may be alive."""
        if holder is None:
            return "the lock file is unreadable (a run killed while writing it)"
        if holder.get("host") == self.owner["host"] and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"the run that held it (pid {holder['pid']}) is no longer running"
            return None
        age = holder.get("_age", 0.0)
        if age > self.stale_seconds:
            return f"its run on {holder.get('host')} stopped updating it {age:.0f} s ago"
        return None

    def _in_use_message(self, holder: dict | None) -> str:
        holder = holder or {}
        workdir = os.path.dirname(self.path)
        return (
            f"the workdir {workdir} is in use by another run: pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')} "
            f"(`{holder.get('command', '?')}`). Wait for it to finish or stop it, or pass another "
            f"--workdir (if that run is gone, delete {self.path})"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                os.utime(self.path)
            except OSError as err:  # e.g. a lost mount: the run itself will report it
                log.debug("lock heartbeat failed: %s", err)
