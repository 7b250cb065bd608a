"""Orbax `CheckpointManager` in `workdir/checkpoints`: periodic, final and preemption saves,
keep-last-N, resume from the latest step, and loud failures for corrupt checkpoints.

Each step directory holds `state` (step, params, optimizer state; sharded arrays restored directly
into the current mesh's shardings), `meta` (JSON: step, task, model config) and `data` (the input
iterator's state, one JSON file per process, written by grain's orbax handler).
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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


def escape_glob_in_base_paths() -> None:
    """Make `epath.Path(base).glob(pattern)` treat only `pattern` as a pattern, as pathlib does.

    etils joins the base path and the pattern into one glob string, so a workdir such as
    `runs/sweep [lr=1e-3]` turns into a character class: orbax then finds no per-process OCDBT
    files to merge and writes checkpoints that report success but can never be restored. Escaping
    the base (`glob.escape`) fixes every glob orbax makes under the checkpoint directory."""
    from etils.epath import gpath

    original = gpath._GPath.glob
    if getattr(original, "escapes_base", False):
        return

    def glob(self, pattern: str):
        base = self._path_str
        if not glob_lib.has_magic(base) or "**" in pattern:
            yield from original(self, pattern)
            return
        for found in self._backend.glob(self._PATH.join(glob_lib.escape(base), pattern)):
            yield self._new(found)

    glob.escapes_base = True
    gpath._GPath.glob = glob


FIX_DISK = "Fix the disk, then run the same command to resume from it"


def finished_steps(directory: str | int) -> list[int]:
    """Steps whose directories are finalised on disk (orbax renames a save's tmp directory only
    once every item is written); `directory` is a path or an open directory's descriptor."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def last_good_text(
    directory: str,
    known=(),
    *,
    before: int | None = None,
    advice: str = FIX_DISK,
    on_disk: list[int] | None = None,
) -> str:
    """The end of an error line: the last good checkpoint's step and path, and `advice`.
    `on_disk`: the finished steps if already listed (else `directory` is listed)."""
    found = set(finished_steps(directory) if on_disk is None else on_disk) | set(known)
    good = sorted(s for s in found if before is None or s < before)
    if not good:
        return "there is no checkpoint to resume from yet"
    return f"the last good checkpoint is step {good[-1]} ({directory}/{good[-1]}), intact. {advice}"


def _open_directory(path: str) -> int | None:
    """A descriptor of the directory at `path` (None where directories cannot be opened)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _identity(path: str, fd: int | None = None) -> tuple[int, int] | None:
    """(device, inode) of the directory open as `fd`, else at `path`; None if there is none."""
    try:
        found = os.fstat(fd) if fd is not None else os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


class Checkpointer:
    """A run's checkpoints in `directory/<step>`: orbax's `CheckpointManager` (every process
    writes its shards; `keep` newest kept; `async_save` writes in the background while training
    goes on) with what a user needs on top of it. A failed write becomes one `CheckpointError`
    that names the step that could not be written and the last good checkpoint; the first save
    of a run is read back, so a disk that cannot hold a checkpoint is found at the first save,
    not at the restore; half-written saves of a killed run are never loaded; a workdir whose
    path has glob characters (`[..]`) is escaped for orbax."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        escape_glob_in_base_paths()
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise OSError(
                err.errno,
                f"cannot create the checkpoint directory {self.directory}: {err.strerror}",
            ) from None
        partial = [n for n in os.listdir(self.directory) if "tmp" in n]
        for name in partial:
            log.warning(
                "ignoring the unfinished checkpoint %s (a save was interrupted); it is never loaded",
                os.path.join(self.directory, name),
            )
        self.partial = partial
        # The directory itself, held open: a lost mount (or a directory removed while running)
        # leaves its path pointing at another directory, where orbax would go on saving
        # checkpoints that the next run cannot find. Each save checks that the path still names
        # this directory, and the steps on it can still be listed after the path is gone.
        self._dir_fd = _open_directory(self.directory)
        self._identity = _identity(self.directory, self._dir_fd)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(1, int(keep)),
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_names=("state", "meta", "data"),
        )
        self._good = self.finished_steps()  # known on disk, even if the disk goes away
        self._saved_config: dict = {}  # the config the checkpoint being resumed was written with
        self._pending: int | None = None  # the step of a save that may still be running
        self._verified = False  # the first save of this run was read back
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def finished_steps(self) -> list[int]:
        """Finished steps in this run's checkpoint directory, even once its path is lost."""
        return finished_steps(self.directory if self._dir_fd is None else self._dir_fd)

    def directory_lost(self) -> bool:
        """Whether the checkpoint directory's path no longer names the directory this run
        opened (its mount went away, or it was removed or replaced)."""
        return self._identity is not None and _identity(self.directory) != self._identity

    def save(self, step: int, state: Any, meta: dict, data_iterator: Any = None) -> bool:
        self.wait()  # the previous save's failure is reported as that step's
        if self.directory_lost():
            raise self._lost_error(step)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001 - orbax and TensorStore raise many types
            raise self._save_error(step, err) from err
        self._pending = step
        if not self._verified:
            self.wait()
            self.verify(step)
            self._verified = True
        return saved

    def wait(self) -> None:
        """Until the running save is on disk; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_error(self._pending, err) from err
        step, self._pending = self._pending, None
        if step is None:
            return
        if self.directory_lost():  # the save may have gone to whatever the path names now
            raise self._lost_error(None if step in self.finished_steps() else step)
        self._good.append(step)

    def abandon_pending(self) -> None:
        """The run is failing for another reason: let a running save finish (or fail) first, so
        that `last_good()` counts it, and close quietly afterwards."""
        try:
            self.wait()
        except CheckpointError as err:
            log.debug("the save running when the run failed did not finish: %s", err)
        self._failed = True

    def verify(self, step: int) -> None:
        """Read `step`'s step counter back from where it was written: a save that orbax reports
        but that cannot be restored must not go unnoticed until the resume. Read with
        TensorStore directly, by this process alone (orbax's restore is a collective, which a
        lost peer would turn into a misleading error here)."""
        path = os.path.join(self.directory, str(step), "state")
        tries = 20 if jax.process_count() > 1 else 1  # another process may finalise the save
        for attempt in range(tries):
            try:
                found = int(_read_saved_array(path, "step"))
                break
            except Exception as failure:  # noqa: BLE001
                err = failure
                if attempt + 1 < tries:
                    time.sleep(0.5)
        else:
            self._failed = True
            raise CheckpointError(
                f"the checkpoint of step {step} was written to {path} but cannot be read back "
                f"({brief(err)}); this workdir cannot hold restorable checkpoints. Pass another "
                "--workdir (a local disk or a mounted bucket)"
            ) from err
        if found != step:
            self._failed = True
            raise CheckpointError(
                f"the checkpoint written to {path} for step {step} reads back as step {found}"
            )

    def _save_error(self, step: int | None, err: BaseException) -> CheckpointError:
        self._failed = True
        text = str(err)
        if "os_error_code='28'" in text or "No space left" in text:
            reason = "no space left on the device"
        elif "os_error_code='13'" in text or "Permission denied" in text:
            reason = "permission denied"
        elif "os_error_code='30'" in text or "Read-only file system" in text:
            reason = "the file system is read-only"
        elif "os_error_code='2'" in text or "No such file" in text:
            reason = "the directory disappeared (a lost mount, or removed while running)"
        else:
            reason = brief(err)
        where = f"step {step} to {self.directory}/{step}" if step is not None else self.directory
        return CheckpointError(
            f"could not write the checkpoint of {where}: {reason}; {self.last_good(step)}"
        )

    def _lost_error(self, step: int | None) -> CheckpointError:
        """The directory's path is lost: `step`'s save (None: no save) did not reach it."""
        self._failed = True
        what = f"could not write the checkpoint of step {step} to {self.directory}/{step}: the"
        if step is None:
            what = "the checkpoint"
        return CheckpointError(
            f"{what} directory {self.directory} disappeared (a lost mount, or removed while "
            f"running); {self.last_good(step)}"
        )

    def last_good(self, before: int | None = None, advice: str = FIX_DISK) -> str:
        """Where a failed run can resume from, as the end of its error line."""
        return last_good_text(
            self.directory,
            self._good,
            before=before,
            advice=advice,
            on_disk=self.finished_steps(),
        )

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

    def check_same_run(
        self, step: int, *, task: str, model: dict, config: dict | None = None
    ) -> list[str]:
        """CheckpointError if `step` was written by a run of another task or architecture (the
        workdir belongs to another run) or with another batch size (the saved input position is
        for that one). Execution fields (dtype, remat) and regularisation may change on resume.
        Returns the other config fields that changed ("optim.lr: 0.002 there, 0.001 now"), for
        the run to print."""
        path = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as err:  # noqa: BLE001 - judged by restore() below
            log.debug("no readable metadata in %s: %s", path, err)
            return []
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
        self._saved_config = _saved_config(meta)
        changes = config_changes(self._saved_config, config) if config is not None else []
        batch = [c for c in changes if c.startswith("batch_size:")]
        if batch:
            raise CheckpointError(
                f"the checkpoint {path} was written with another batch size ({batch[0]}): its "
                "saved input position is for that batch size. Resume with "
                "the original batch_size, or train this config in a new --workdir (with "
                "--config.init_from pointing at this run's model/ to start from its weights)"
            )
        return [c for c in changes if c.split(":")[0] not in NOT_SETTINGS]

    def restore(
        self, step: int, abstract_state: Any, config: dict | None = None
    ) -> tuple[Any, dict]:
        """Restore `step` into `abstract_state`'s shapes, dtypes and shardings, or raise: a
        checkpoint whose tree does not fit this run's state names the settings that changed."""
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
            structure_error = "tree structures do not match" in str(err)
            mismatch = self._structure_mismatch(step, abstract_state, structure_error)
            if mismatch is not None:
                changes = config_changes(self._saved_config, config or {})
                ranked = [c for c in changes if c.startswith("optim.")] + [
                    c for c in changes if not c.startswith("optim.")
                ]
                named = "; ".join(ranked[:4]) or "no config field differs: another version?"
                raise CheckpointError(
                    f"the checkpoint at {path} is intact but holds training state of another "
                    f"shape than this run's ({mismatch}): it was written with other settings "
                    f"({named}). Resume with the settings it was written with, or train with "
                    "these ones in a new --workdir."
                ) from err
            raise CheckpointError(
                f"the checkpoint at {path} cannot be restored; it is corrupt or partial "
                f"({brief(err)}). It was "
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

    def _structure_mismatch(
        self, step: int, abstract_state: Any, structure_error: bool = False
    ) -> str | None:
        """How the saved state's tree differs from `abstract_state`'s, or None if it does not
        (or its metadata cannot be read: then the checkpoint is damaged)."""
        try:
            saved = ocp.PyTreeCheckpointHandler().metadata(
                epath.Path(os.path.join(self.directory, str(step), "state"))
            )
            saved_tree = saved.tree
        except Exception:  # noqa: BLE001
            return None
        ours, theirs = _leaf_paths(abstract_state), _leaf_paths(saved_tree)
        if ours == theirs:  # the same arrays; optax states without arrays may still differ
            return "the same arrays, other optimizer stages" if structure_error else None
        only_saved, only_ours = sorted(theirs - ours), sorted(ours - theirs)
        parts = [f"{len(theirs)} arrays there, {len(ours)} now"]
        if only_saved:
            parts.append(f"only there: {only_saved[0]}")
        if only_ours:
            parts.append(f"only now: {only_ours[0]}")
        return ", ".join(parts)

    def close(self) -> None:
        """Wait for the running save and close; after a reported failure, close quietly (the
        error already raised is the one to show)."""
        try:
            self.wait()
            self.manager.close()
        except Exception:
            if not self._failed:
                raise
            log.debug("closing after a failed save", exc_info=True)
        finally:
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None


def _canonical_model(model: dict) -> dict:
    """A run's model fields in today's canonical form, as JSON (tuples as lists): checkpoints of
    earlier versions stored `num_heads` as the official int with `head_mul`."""
    try:
        model = dataclasses.asdict(HieraConfig.from_dict(model))
    except (TypeError, ValueError):
        pass  # compared field by field as stored
    return json.loads(json.dumps(model))


# Config keys that are not settings of the run (where files go, how many input workers).
NOT_SETTINGS = frozenset(
    {"compilation_cache_dir", "data.workers", "data.data_dir", "peer_timeout_seconds"}
)


def _saved_config(meta: dict) -> dict:
    """The config a checkpoint's run was started with (stored as JSON in its meta item)."""
    text = meta.get("config")
    try:
        return json.loads(text) if isinstance(text, str) else dict(text or {})
    except (TypeError, ValueError):
        return {}


def _flat(tree: Any, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """Every config field both configs have and that differs, as "key: old there, new now"."""
    old, new = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
    return [
        f"{k}: {old[k]!r} there, {new[k]!r} now"
        for k in sorted(set(old) & set(new))
        if old[k] != new[k]
    ]


def _leaf_paths(tree: Any) -> set[str]:
    """Leaf paths as "a/0/mu/b": dict keys, sequence indices and namedtuple fields alike (orbax
    stores optax's namedtuple states as dicts and tuples as lists)."""

    def name(key) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path) for path, _ in leaves}


def _read_saved_array(item_dir: str, name: str) -> np.ndarray:
    """One array of an orbax PyTree item saved with OCDBT (orbax's default), read through the
    item's merged OCDBT manifest, as a restore would."""
    import tensorstore as ts

    kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": item_dir + "/"}, "path": name}
    errors = []
    for driver in ("zarr", "zarr3"):  # orbax writes zarr v2 unless told otherwise
        try:
            spec = {"driver": driver, "kvstore": kvstore}
            return np.asarray(ts.open(spec, open=True, read=True).result().read().result())
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    raise errors[0]
