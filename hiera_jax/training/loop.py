"""`train_and_evaluate(config, workdir)`: one loop for MAE pretraining and finetuning.

Resume order (big_vision): a checkpoint already in `workdir` > `config.init_from` (an MAE or
converted checkpoint's encoder) > from scratch. State is born sharded (`jax.jit` with
`out_shardings`), the step is jitted with in/out shardings and donated state, and the batch is
assembled from each process's rows into one global array. The pieces, in order: `open_input`,
`setup.build_setup` (model, optimizer, shardings), `restore_or_init`, `make_evaluator`,
`run_steps`, `finish`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from hiera_jax import families
from hiera_jax.training import optim, sharding, visualize
from hiera_jax.training.checkpoint import Checkpointer, last_good_text
from hiera_jax.training.config import resolve_model_config, validate_config
from hiera_jax.training.cost import flops as flops_lib
from hiera_jax.training.inputs import batching, pipeline, sources, tfdata
from hiera_jax.training.inputs import data as data_lib
from hiera_jax.training.metrics import MetricLogger
from hiera_jax.training.peers import PeersLost, PeerWatch
from hiera_jax.training.preemption import StopSignal
from hiera_jax.training.setup import (
    TrainSetup,
    build_setup,
    check_batching,
    model_flops_per_step,
)
from hiera_jax.training.steps import eval_step, reconstruct, train_step
from hiera_jax.training.workdir_lock import WorkdirInUse, WorkdirLock

__all__ = ["train_and_evaluate", "train_step", "model_flops_per_step", "load_encoder"]

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("patch_embed", "pos_embed", "blocks_")


# ============================================================================ init from a checkpoint
def local_path(path: str, what: str) -> str:
    """`path`, unless it is a URL: everything here goes through the local filesystem."""
    if "://" in str(path):
        raise ValueError(
            f"{what}={path} is a URL; training reads and writes local paths. Mount the bucket "
            "(e.g. `gcsfuse --implicit-dirs BUCKET /mnt/gcs`) and pass the mounted path."
        )
    return path


def load_encoder(
    path: str, params: Any, family: families.Family | None = None
) -> tuple[dict, list[str]]:
    """Encoder leaves of a model directory, a training workdir holding `model/`, or any pretrained
    name the hub resolves (`facebook/hiera-base-224-mae-hf`, `mae_hiera_base_224`, an official
    `.pth` URL), shape-checked; what the model's family takes (its record's `encoder_params`:
    SAM 2's HieraDet also takes an abs-win Hiera's encoder or any `load_hieradet` source;
    None: Hiera's).

    Returns ({flat path: np.ndarray} for every encoder leaf of `params`, names left at init).
    """
    text = str(path)
    if not text.startswith(("http://", "https://")):
        text = local_path(text, "init_from")  # gs:// and the like: mount it first
    family = family or families.get(families.DEFAULT)
    source, directory = family.encoder_params(text)
    target = flax.traverse_util.flatten_dict(params, sep="/")
    loaded, mismatched, kept = {}, [], []
    for name, leaf in target.items():
        if not name.startswith(ENCODER_PREFIXES):
            kept.append(name)
            continue
        if name not in source:
            mismatched.append(f"{name}: missing in {directory}")
        elif tuple(source[name].shape) != tuple(leaf.shape):
            mismatched.append(f"{name}: {tuple(source[name].shape)} vs {tuple(leaf.shape)}")
        else:
            loaded[name] = np.asarray(source[name], np.float32)
    if mismatched:
        raise ValueError(
            f"the encoder in {directory} does not fit this model: " + "; ".join(mismatched[:20])
        )
    return loaded, kept


# ============================================================================ workdir
def prepare_workdir(workdir: str) -> str:
    """The absolute workdir, created and checked writable before anything is compiled."""
    workdir = os.path.abspath(local_path(workdir, "workdir"))
    if "\\" in workdir:  # every other character the OS accepts works (tests/test_train_faults)
        raise ValueError(
            f"workdir {workdir} holds a backslash: orbax's checkpoints there would be written "
            "but could not be read back (TensorStore's paths treat it as an escape); pass a "
            "--workdir without `\\`"
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"workdir {workdir} is a file; pass a directory as --workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise type(e)(
            e.errno, f"workdir {workdir} is not writable ({e.strerror}); pass another --workdir"
        ) from None
    return workdir


def check_free_space(workdir: str, setup: TrainSetup) -> None:
    """Refuse to start when the workdir's disk cannot hold two checkpoints of this state."""
    state_bytes = sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(setup.abstract_state)
    )
    needed = 2 * state_bytes + 64 * 2**20  # a checkpoint being written beside the last one
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise OSError(
            28,  # ENOSPC
            f"workdir {workdir}: its disk has {free / 2**20:.0f} MiB free and checkpoints of this "
            f"run need about {needed / 2**20:.0f} MiB; free space or pass another --workdir",
        )


# ============================================================================ input
@dataclasses.dataclass
class Input:
    """The run's data: sources, transforms, and a factory for the train iterator at a step."""

    train_source: Any
    eval_source: Any
    eval_transform: data_lib.Transform
    use_tf: bool
    make_train_iter: Callable[[int], Any]  # start step -> iterator of local batches
    repeated_aug: int = 1

    @property
    def examples_per_epoch(self) -> int:
        # An epoch shows every example once, i.e. `repeated_aug` times with repeated augmentation.
        return len(self.train_source) * max(1, self.repeated_aug)


def open_input(config: ml_collections.ConfigDict, model_config: Any = None) -> Input:
    """Train and eval sources of `config.data`, checked against the model (`model_config`: its
    config, where resolved already); nothing is read yet."""
    model_config = resolve_model_config(config) if model_config is None else model_config
    train_source = sources.make_source(
        config.data, config.data.train_split, model_config.input_size
    )
    eval_source = sources.make_source(
        config.data, config.data.eval_split, model_config.input_size, train_source=train_source
    )
    if train_source.channels != model_config.in_chans:
        log.info(
            "data has %d channels, model %d: converting",
            train_source.channels,
            model_config.in_chans,
        )
    num_classes = model_config.num_classes
    dataset_classes = getattr(train_source, "num_classes", num_classes)
    if config.task == "classification" and dataset_classes != num_classes:
        raise ValueError(
            f"the dataset has {dataset_classes} classes but the model "
            f"num_classes={num_classes}; set --config.model.num_classes"
        )
    use_tf = isinstance(train_source, tfdata.TfDataSource)
    input_kwargs = dict(
        global_batch=config.batch_size,
        seed=config.seed,
        num_classes=num_classes,
        data_config=config.data,
        with_labels=config.task == "classification",
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_transform = data_lib.Transform(
        config.data, model_config.input_size, model_config.in_chans, train=True
    )

    def make_train_iter(start_step: int = 0):
        """A training input iterator at `start_step` (each batch is a function of its step)."""
        if use_tf:
            it = tfdata.TfDataTrainIterator(train_source, train_transform, **input_kwargs)
            it.seek(start_step)
            return it
        return iter(
            pipeline.train_dataset(
                train_source, train_transform, start_step=start_step, **input_kwargs
            )
        )

    return Input(
        train_source=train_source,
        eval_source=eval_source,
        eval_transform=data_lib.Transform(
            config.data, model_config.input_size, model_config.in_chans, train=False
        ),
        use_tf=use_tf,
        make_train_iter=make_train_iter,
        repeated_aug=int(config.data.repeated_aug),
    )


# ============================================================================ state
def restore_or_init(
    setup: TrainSetup, ckpt: Checkpointer, p_init, init_key, data: Input
) -> tuple[Any, Any, int | None, list[str]]:
    """(state, train iterator, step resumed from or None, notes): the latest checkpoint in the
    workdir, else a fresh init with `config.init_from`'s encoder copied in."""
    config = setup.config
    train_iter = data.make_train_iter(0)
    latest = ckpt.latest_step()
    notes = [f"ignored unfinished checkpoint {ckpt.directory}/{name}" for name in ckpt.partial]
    with jax.set_mesh(setup.mesh):
        if latest is not None:
            settings = config.to_dict()
            changed = ckpt.check_same_run(
                latest,
                task=setup.task,
                model=dataclasses.asdict(setup.model_config),
                config=settings,
            )
            state, _ = ckpt.restore(latest, setup.abstract_sharded_state(), config=settings)
            notes.append(f"resumed from {ckpt.directory}/{latest}")
            if changed:
                notes.append("settings changed since that checkpoint: " + "; ".join(changed[:8]))
            if not ckpt.restore_data(latest, train_iter):
                notes.append("no saved input state for this process layout: input from the step")
                train_iter.close()
                train_iter = data.make_train_iter(latest)
            return state, train_iter, latest, notes
        state = p_init(init_key)
        if config.init_from:
            loaded, kept = load_encoder(
                config.init_from,
                setup.abstract_state["params"],
                families.of_config(setup.model_config),
            )
            flat = flax.traverse_util.flatten_dict(state["params"], sep="/")
            flat_sh = flax.traverse_util.flatten_dict(setup.state_sh["params"], sep="/")
            for name, value in loaded.items():
                flat[name] = jax.device_put(value, flat_sh[name])
            state["params"] = flax.traverse_util.unflatten_dict(flat, sep="/")
            notes.append(
                f"initialised {len(loaded)} encoder tensors from {config.init_from}; "
                f"fresh init for {', '.join(kept)}"
            )
    return state, train_iter, None, notes


# ============================================================================ evaluation
def make_evaluator(
    setup: TrainSetup, data: Input, eval_key, pictures_dir: str
) -> tuple[Callable[[Any, int], dict[str, float]], bool]:
    """(evaluate(params, step) -> mean metrics, draws_pictures). MAE runs also write a
    reconstruction PNG of the first `num_vis` eval images at each evaluation."""
    config, mesh, task = setup.config, setup.mesh, setup.task
    with jax.set_mesh(mesh):
        p_eval = jax.jit(
            functools.partial(eval_step, model=setup.model, task=task),
            in_shardings=(setup.state_sh["params"], setup.eval_batch_sh, setup.repl),
            out_shardings=setup.repl,
        )
        p_recon = jax.jit(
            functools.partial(reconstruct, model=setup.model),
            in_shardings=(setup.state_sh["params"], setup.batch_sh, setup.repl),
            out_shardings=setup.repl,
        )
    n_vis = min(int(config.num_vis), len(data.eval_source)) if task == "mae" else 0
    vis_images = None
    if n_vis > 0:
        os.makedirs(pictures_dir, exist_ok=True)
        vis = [
            data.eval_transform(im, None) for im in data_lib.first_images(data.eval_source, n_vis)
        ]
        padded = -(-n_vis // mesh.size) * mesh.size
        vis += [vis[0]] * (padded - n_vis)
        vis_images = np.stack(vis).astype(np.float32)

    def evaluate(params, step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        batches = (tfdata if data.use_tf else pipeline).eval_batches(
            data.eval_source,
            data.eval_transform,
            global_batch=setup.eval_batch,
            max_examples=int(config.eval_max_examples),
            with_labels=setup.with_labels,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            workers=config.data.workers,
        )
        with jax.set_mesh(mesh):
            for i, local in enumerate(batches):
                out = p_eval(
                    params, sharding.global_batch(local, mesh), jax.random.fold_in(eval_key, i)
                )
                for k, v in jax.device_get(out).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            count = max(sums.pop("count", 0.0), 1.0)
            result = {k: v / count for k, v in sums.items()}
            if vis_images is not None:
                images = jax.device_put(vis_images, setup.batch_sh)
                pred, visible = jax.device_get(p_recon(params, images, eval_key))
                if jax.process_index() == 0:
                    path = os.path.join(pictures_dir, f"reconstruction_{step:06d}.png")
                    visualize.save_reconstruction_png(
                        path,
                        vis_images[:n_vis],
                        pred[:n_vis],
                        visible[:n_vis],
                        setup.model_config,
                        config.data.mean,
                        config.data.std,
                    )
                    shutil.copyfile(path, os.path.join(pictures_dir, "latest.png"))
        return result

    return evaluate, vis_images is not None


# ============================================================================ the step loop
@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    history: list[dict[str, float]]
    last_eval: dict[str, float]
    stopped_early: bool
    first_step_seconds: float | None  # includes compiling the step (or loading it from the cache)


def run_steps(
    setup: TrainSetup,
    state: Any,
    train_iter: Any,
    *,
    p_train,
    train_key,
    start_step: int,
    ckpt: Checkpointer,
    meta_base: dict,
    logger: MetricLogger,
    evaluate: Callable[[Any, int], dict[str, float]],
    flops_per_step: float | None,
    peak_flops: float | None,
) -> LoopResult:
    """Train from `start_step` to `total_steps`: log, checkpoint, evaluate; a signal (or a
    multi-host preemption notice) saves a checkpoint and stops."""
    config, mesh, total_steps = setup.config, setup.mesh, setup.total_steps
    local_batch = config.batch_size // jax.process_count()
    stop = StopSignal()
    history: list[dict[str, float]] = []
    last_eval: dict[str, float] = {}
    step, stopped_early = start_step, False
    first_step_seconds = None
    try:
        if step < total_steps:  # the first step waits for the compile: say so, not silence
            logger.print("compiling the train step (or loading it from the compilation cache) ...")
        t0, t0_step = time.time(), step
        while step < total_steps:
            local = next(train_iter)
            if step == start_step:  # the restored input is where the restored state is
                batching.check_position(
                    local, step, config.batch_size, jax.process_index() * local_batch
                )
            del local["position"]
            with jax.set_mesh(mesh):
                batch = sharding.global_batch(local, mesh)
                with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
                    state, metrics = p_train(state, batch, train_key)
            if step == start_step:  # compilation (or a compilation-cache load) and one step
                jax.block_until_ready(metrics)
                first_step_seconds = time.time() - t0
                logger.print(
                    f"first step took {first_step_seconds:.1f} s (compiling the train step, "
                    "or loading it from the compilation cache)"
                )
            step += 1
            if step % max(1, config.log_every) == 0 or step == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step}")
                elapsed = max(time.time() - t0, 1e-9)
                metrics["images_per_sec"] = (step - t0_step) * config.batch_size / elapsed
                if flops_per_step:
                    achieved = flops_per_step * (step - t0_step) / elapsed / mesh.size
                    metrics["tflops_per_sec_per_device"] = achieved / 1e12
                    if peak_flops:
                        metrics["mfu"] = achieved / peak_flops
                t0, t0_step = time.time(), step
                metrics["epoch"] = step / setup.steps_per_epoch
                logger.write("train", step, metrics)
                history.append({"step": step, **metrics})
            logger.advance(step)

            preempted = stop.should_stop(step)
            is_last = step == total_steps
            every = config.checkpoint_every
            if (every > 0 and step % every == 0) or is_last or preempted:
                ckpt.save(step, state, {**meta_base, "step": step}, data_iterator=train_iter)
            if preempted:
                ckpt.wait()
                logger.print(
                    f"stopped by signal at step {step}; checkpoint saved to {ckpt.directory}/{step}"
                )
                stopped_early = True
                break
            due = config.eval_every > 0 and step % config.eval_every == 0
            if due or (is_last and config.eval_every >= 0):
                last_eval = evaluate(state["params"], step)
                logger.write("eval", step, last_eval)
        if step >= total_steps and start_step >= total_steps:
            logger.print(f"already trained to step {total_steps}; nothing to do")
    finally:
        stop.restore()
    return LoopResult(state, step, history, last_eval, stopped_early, first_step_seconds)


def start_line(
    setup: TrainSetup, start_step: int, resumed: bool, flops_per_step, peak_flops
) -> str:
    """The one line a run prints before its first step."""
    config = setup.config
    n_params = optim.count_params(setup.abstract_state["params"])
    batch_text = f"batch {config.batch_size}"
    if setup.accum_steps > 1:
        batch_text += f" as {setup.accum_steps} microbatches"
    if flops_per_step:
        batch_text += f", {flops_per_step / 1e9:.3g} GFLOP/step"
        if peak_flops:
            batch_text += f" (MFU against {peak_flops / 1e12:.3g} TFLOP/s/device)"
    if resumed:
        origin = f"resumed at step {start_step}"
    elif config.init_from:
        origin = f"encoder from {config.init_from}"
    else:
        origin = "from scratch"
    return (
        f"{setup.task}: {n_params / 1e6:.2f}M params, mesh {dict(setup.mesh.shape)}, "
        f"{batch_text}, {setup.total_steps} steps ({setup.steps_per_epoch:.1f}/epoch), "
        f"peak lr {setup.peak_lr:.3g}, {origin}"
    )


# ============================================================================ the run
def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices=None,
    return_params: bool = False,
    return_state: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train (or resume) as `config` says, in `workdir`; returns a summary dict.

    The summary has `step`, `history` (the train metrics logged by this call), `eval` (the last
    evaluation), `stopped_early` (a signal or preemption stopped the run), the paths written and,
    with return_params, the final params as numpy arrays (return_state: the live sharded state).
    """
    validate_config(config)
    mesh = sharding.create_mesh(config.mesh_shape, devices)
    check_batching(config, mesh)  # before anything is written
    workdir = prepare_workdir(workdir)
    lock = lock_workdir(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    watch = PeerWatch(
        lambda: last_good_text(ckpt_dir, advice=RESTART_ALL),
        timeout=float(config.get("peer_timeout_seconds", 60.0)),
    ).start()
    try:
        summary = _train_in_workdir(
            config,
            workdir,
            mesh,
            return_params=return_params,
            return_state=return_state,
            progress=progress,
        )
    except jax.errors.JaxRuntimeError as e:
        watch.stop(finished=False)  # the peers must notice this process is gone
        text = " ".join(str(e).split())[:300]
        if jax.process_count() == 1 or not any(w in text for w in PEER_FAILURE_WORDS):
            raise
        raise PeersLost(
            f"a collective failed, another process of this run is gone or unreachable ({text}); "
            f"{last_good_text(ckpt_dir, advice=RESTART_ALL)}"
        ) from e
    except BaseException:
        watch.stop(finished=False)
        raise
    finally:
        lock.release()
    watch.stop(finished=True)
    return summary


RESTART_ALL = "Restart every process with the same command to resume from it"
# What a collective's error says when the process at the other end is gone (gloo on CPU, NCCL on
# GPU, the coordination service everywhere); a device out of memory says none of these.
PEER_FAILURE_WORDS = ("Gloo", "NCCL", "Connection", "connection", "Socket", "UNAVAILABLE", "peer")


def lock_workdir(workdir: str) -> WorkdirLock:
    """The workdir's lock, taken by process 0 for the whole run; WorkdirInUse on every process
    when another run holds it."""
    lock = WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirInUse as e:
            error = e
    if jax.process_count() > 1:  # every process learns process 0's answer
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirInUse(
                f"the workdir {workdir} is in use by another run (process 0's error names it)"
            )
    if error is not None:
        raise error
    return lock


def _train_in_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh,
    *,
    return_params: bool,
    return_state: bool,
    progress: bool | None,
) -> dict[str, Any]:
    model_config = resolve_model_config(config)  # resolved once per run
    data = open_input(config, model_config)
    setup = build_setup(config, mesh, data.examples_per_epoch, model_config)
    check_free_space(workdir, setup)

    key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(key)
    eval_key = jax.random.fold_in(key, 2**20)
    with jax.set_mesh(mesh):
        p_init = jax.jit(setup.init_state, out_shardings=setup.state_sh)
        p_train = setup.jit_train_step()
        # Model FLOPs per step for MFU, from p_train's arguments as shapes (as the loop passes them).
        train_args = setup.abstract_train_args(train_key)
        flops_per_step = model_flops_per_step(setup, train_args, p_train)
    peak_flops = flops_lib.peak_flops_per_device(
        mesh.devices.flat[0].device_kind, float(config.peak_flops_per_device)
    )

    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    model_config = setup.model_config
    meta_base = {
        "task": setup.task,
        "model": dataclasses.asdict(model_config),
        "config": config.to_json(),
    }
    train_iter = None
    logger = None
    try:
        state, train_iter, resumed_from, notes = restore_or_init(
            setup, ckpt, p_init, init_key, data
        )
        start_step = int(jax.device_get(state["step"]))
        logger = MetricLogger(
            workdir,
            total_steps=setup.total_steps,
            start_step=start_step,
            enabled=jax.process_index() == 0,
            hparams=config.to_dict(),
            progress=progress,
        )
        for note in notes:
            logger.print(note)
        logger.print(
            start_line(setup, start_step, resumed_from is not None, flops_per_step, peak_flops)
        )
        pictures_dir = os.path.join(workdir, "pictures")
        evaluate, draws_pictures = make_evaluator(setup, data, eval_key, pictures_dir)
        try:
            result = run_steps(
                setup,
                state,
                train_iter,
                p_train=p_train,
                train_key=train_key,
                start_step=start_step,
                ckpt=ckpt,
                meta_base=meta_base,
                logger=logger,
                evaluate=evaluate,
                flops_per_step=flops_per_step,
                peak_flops=peak_flops,
            )
        except OSError as e:  # the workdir's disk filled, turned read-only or went away
            ckpt.abandon_pending()
            text = e.strerror or str(e)
            if e.filename:
                text += f": {e.filename}"
            raise OSError(e.errno, f"{text}; {ckpt.last_good()}") from e
    finally:
        ckpt.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
        if logger is not None:
            logger.close()

    summary: dict[str, Any] = {
        "step": result.step,
        "history": result.history,
        "eval": result.last_eval,
        "stopped_early": result.stopped_early,
        "resumed_from": resumed_from,
        "workdir": workdir,
        "checkpoint_dir": ckpt_dir,
        "pictures_dir": pictures_dir if draws_pictures else None,
        "metrics_file": os.path.join(workdir, "metrics.jsonl"),
        "model_dir": None,
        "flops_per_step": flops_per_step,
        "first_step_seconds": result.first_step_seconds,
        "mfu": result.history[-1].get("mfu") if result.history else None,  # last interval
    }
    summary.update(
        finish(
            setup,
            result,
            workdir,
            return_params=return_params,
            return_state=return_state,
            class_names=sources.class_names(data.train_source),
        )
    )
    return summary


def finish(
    setup: TrainSetup,
    result: LoopResult,
    workdir: str,
    *,
    return_params: bool,
    return_state: bool,
    class_names: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Export `workdir/model` when the run completed (a classifier names its classes as the data
    does); gather params/state the caller asked for."""
    config, state = setup.config, result.state
    out: dict[str, Any] = {}
    export = config.export_model and not result.stopped_early
    final_params = None
    if export or return_params:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            final_params = multihost_utils.process_allgather(state["params"], tiled=True)
        else:
            final_params = jax.device_get(state["params"])
    if export:  # the family's directory: transformers' layout for Hiera, timm's for HieraDet
        out["model_dir"] = families.of_config(setup.model_config).export(
            os.path.join(workdir, "model"),
            final_params,
            setup.model_config,
            task=setup.task,
            name=config.model.name,
            mean=tuple(config.data.mean),
            std=tuple(config.data.std),
            crop_pct=float(config.data.crop_pct),
            class_names=class_names,
        )
    if return_params:
        out["params"] = final_params
    if return_state:
        out["state"] = state  # the live, sharded arrays (tests check their shardings)
        out["mesh"] = setup.mesh
    return out
