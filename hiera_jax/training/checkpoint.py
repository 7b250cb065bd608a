"""Orbax `CheckpointManager` in `workdir/checkpoints`: periodic, final and preemption saves,
keep-last-N, resume from the latest step, and loud failures for corrupt checkpoints.

Each step directory holds `state` (step, params, optimizer state; sharded arrays restored directly
into the current mesh's shardings), `meta` (JSON: step, task, model config) and `data` (the input
iterator's state, one JSON file per process, written by grain's orbax handler).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from hiera_jax.models.config import HieraConfig

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupt, partial or for another model)."""


# Model fields a resumed run may change: how it computes and regularises, not what it learns.
RESUMABLE_CHANGES = frozenset(
    {
        "dtype",
        "remat",
        "scan_blocks",
        "attention_kernel",
        "mlp_kernel",
        "drop_path_rate",
        "head_dropout",
        "mask_ratio",
        "head_init_scale",
        # Initialisers, labels and call defaults: no parameter depends on them.
        "initializer_range",
        "layer_norm_init",
        "class_names",
        "problem_type",
        "out_stage_indices",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
    }
)


def brief(err: BaseException) -> str:
    """The first line of an error (orbax and TensorStore errors run to hundreds of lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:300]}"


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        partial = [n for n in os.listdir(self.directory) if "tmp" in n]
        for name in partial:
            log.warning(
                "ignoring the unfinished checkpoint %s (a save was interrupted); it is never loaded",
                os.path.join(self.directory, name),
            )
        self.partial = partial
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(1, int(keep)),
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_names=("state", "meta", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, data_iterator: Any = None) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_data(self, step: int, data_iterator: Any) -> bool:
        """Set `data_iterator` to its state saved at `step`; False if this checkpoint holds none
        for this process layout (older checkpoint, or a different number of processes)."""
        directory = os.path.join(self.directory, str(step), "data")
        index, count = jax.process_index(), jax.process_count()
        if not os.path.isfile(os.path.join(directory, f"process_{index}-of-{count}.json")):
            return False
        try:
            self.manager.restore(
                step,
                args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)),
            )
        except Exception as err:
            raise CheckpointError(
                f"the input pipeline state in {directory} cannot be restored ({brief(err)}); it "
                "is damaged, or data.backend or the dataset changed. Move the checkpoint away "
                f"(`mv {os.path.dirname(directory)} {os.path.dirname(directory)}.bad`) to resume "
                "from the previous one, or use a new workdir"
            ) from err
        return True

    def check_same_run(self, step: int, *, task: str, model: dict) -> None:
        """CheckpointError if `step` was written by a run of another task or architecture (the
        workdir belongs to another run). Execution fields (dtype, remat) and regularisation may
        change on resume."""
        path = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as err:  # noqa: BLE001 - judged by restore() below
            log.debug("no readable metadata in %s: %s", path, err)
            return
        saved_task, saved_model = meta.get("task"), _canonical_model(meta.get("model") or {})
        ours = _canonical_model(model)
        differ = [
            f"{k}: {saved_model.get(k)!r} there, {ours.get(k)!r} now"
            for k in sorted(set(saved_model) & set(ours))  # fields both versions know
            if k not in RESUMABLE_CHANGES and saved_model.get(k) != ours.get(k)
        ]
        if saved_task != task:
            differ.insert(0, f"task: {saved_task!r} there, {task!r} now")
        if differ:
            raise CheckpointError(
                f"the workdir {os.path.dirname(self.directory)} belongs to another run: its "
                f"checkpoint {path} was written for a different model ({'; '.join(differ[:4])}). "
                "Use a new --workdir for this config, or the original config to resume that run."
            )

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore `step` into `abstract_state`'s shapes, dtypes and shardings, or raise."""
        path = os.path.join(self.directory, str(step))
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
            state, meta = restored["state"], restored["meta"]
            jax.block_until_ready(state)
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(
                f"the checkpoint at {path} cannot be restored; it is corrupt, partial, or was "
                f"written for another model or optimizer ({brief(err)}). It was "
                f"not loaded. Move it away (e.g. `mv {path} {path}.corrupt`) to resume from the "
                "previous checkpoint, or use a new workdir to start over."
            ) from err
        if not isinstance(meta, dict) or int(meta.get("step", -1)) != int(step):
            raise CheckpointError(
                f"the checkpoint at {path} has inconsistent metadata {meta!r}; it was not loaded"
            )
        if int(jax.device_get(state["step"])) != int(step):
            raise CheckpointError(
                f"the checkpoint at {path} holds state for step {int(state['step'])}, not {step}"
            )
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopSignal:
    """SIGTERM (preemption) and the first Ctrl-C set a flag the loop checks between steps; the
    loop then saves a checkpoint and exits cleanly. A second Ctrl-C interrupts at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        self.requested = True
        self.signum = signum
        if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt as usual
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("received signal %d: saving a checkpoint after this step", signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _canonical_model(model: dict) -> dict:
    """A run's model fields in today's canonical form, as JSON (tuples as lists): checkpoints of
    earlier versions stored `num_heads` as the official int with `head_mul`."""
    try:
        model = dataclasses.asdict(HieraConfig.from_dict(model))
    except (TypeError, ValueError):
        pass  # compared field by field as stored
    return json.loads(json.dumps(model))
