"""What a person sees: a progress bar (tqdm on a terminal, plain lines otherwise), a JSON-lines
log (`workdir/metrics.jsonl`) and TensorBoard event files (`workdir/tensorboard`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def _scalar(value: Any) -> float:
    return float(value)


class MetricLogger:
    """One place that writes a run's metrics: `metrics.jsonl` (one JSON record per line, the
    record of the run that tests and plots read), TensorBoard events where tensorboardX is
    installed, and a tqdm bar on a terminal. A resumed run first drops what the killed run wrote
    after its checkpoint, so each step appears once. Only process 0 writes (`enabled`)."""

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        hparams: dict | None = None,
        progress: bool | None = None,
    ):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tensorboard")
        self.bar = None
        self.tb = None
        self.tty = sys.stderr.isatty() if progress is None else progress
        if not enabled:
            return
        drop_records_after(self.jsonl_path, start_step)
        self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 - closed in close()
        try:
            from tensorboardX import SummaryWriter

            # A resumed run logs the steps after its checkpoint again: TensorBoard drops the
            # events of the killed run from purge_step on, as the JSON log does below.
            purge = start_step + 1 if start_step > 0 else None
            self.tb = SummaryWriter(logdir=self.tb_dir, purge_step=purge)
            if hparams:
                self.tb.add_text("config", "```\n" + json.dumps(hparams, indent=2) + "\n```", 0)
        except ImportError:
            log.warning("tensorboardX is not installed: no TensorBoard event files")
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"kind": kind, "step": int(step), "time": time.time(), **values}
        where = self.jsonl_path
        try:  # a file object's error names no file: say which one
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
            if self.tb is not None:
                where = self.tb_dir
                for key, value in values.items():
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
                self.tb.flush()
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}: cannot write {where}") from None
        if kind == "train" and self.bar is not None:
            names = {"loss": "loss", "lr": "lr", "images_per_sec": "img/s", "mfu": "mfu"}
            shown = {names[k]: values[k] for k in names if k in values}
            self.bar.set_postfix(
                {k: _bar_text(k, v) for k, v in shown.items()},
                refresh=False,
            )
        elif self.bar is None or kind != "train":
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            self.print(f"[{kind}] step {step}: {text}")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        try:  # on a full or lost disk: the run's own error says so, not this clean-up's
            if self.tb is not None:
                self.tb.close()
            self._jsonl.close()
        except OSError as e:
            log.debug("closing the metric files failed: %s", e)


def drop_records_after(path: str, step: int) -> None:
    """Keep the records of steps <= `step` (a resume point); a torn last line goes too.

    The log then holds one record per (kind, step) however often a run was killed and resumed.
    Rewritten atomically, so a kill during this leaves the old log.
    """
    if not os.path.isfile(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(record.get("step", 0)) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _bar_text(name: str, value: float) -> str:
    if name == "img/s":
        return f"{value:.0f}"
    if name == "mfu":
        return f"{value:.1%}"
    return f"{value:.3g}"
