"""`train_and_evaluate(config, workdir)`: one loop for MAE pretraining and finetuning.

Resume order (big_vision): a checkpoint already in `workdir` > `config.init_from` (an MAE or
converted checkpoint's encoder) > from scratch. State is born sharded (`jax.jit` with
`out_shardings`), the step is jitted with in/out shardings and donated state, and the batch is
assembled from each process's rows into one global array.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hiera_jax import masking
from hiera_jax.io import load_pretrained, save_pretrained
from hiera_jax.model import init_params
from hiera_jax.training import data as data_lib
from hiera_jax.training import flops as flops_lib
from hiera_jax.training import optim, pipeline, sharding, tfdata, visualize
from hiera_jax.training.checkpoint import Checkpointer, StopSignal
from hiera_jax.training.config import build_model, hiera_config
from hiera_jax.training.metrics import MetricLogger

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("patch_embed", "pos_embed", "blocks_")


# ============================================================================ steps
def train_step(
    state, batch, key, *, model, tx, lr_fn, task, label_smoothing, num_classes, accum_steps=1
):
    """One optimizer step: (state, batch, key) -> (state, metrics). Randomness: fold_in(key, step).

    With accum_steps A > 1 the batch runs as A microbatches, one after another (`lax.scan`), and
    their averaged gradient makes one update. Microbatch i holds rows i, A+i, 2A+i, ... so every
    device keeps its own rows (JAX_NOTES 5.7). MAE draws the keep-mask for the whole batch first,
    so each row is masked as it is with A = 1; dropout and drop path draw per microbatch.
    """
    step = state["step"]
    mask_key, drop_key = jax.random.split(jax.random.fold_in(key, step))

    def loss_fn(params, batch, mask, rngs):
        if task == "mae":
            loss, *_ = model.apply({"params": params}, batch["image"], mask, train=True, rngs=rngs)
            return loss, {}
        logits = model.apply({"params": params}, batch["image"], train=True, rngs=rngs)
        targets = batch["label"]
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1))
        return loss, {"accuracy": accuracy}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    params = state["params"]
    if accum_steps == 1:
        rngs = {"mask": mask_key, "dropout": drop_key}
        (loss, aux), grads = grad_fn(params, batch, None, rngs)
    else:
        mask = draw_keep_mask(model, mask_key, batch["image"].shape[0]) if task == "mae" else None
        micro = split_microbatches({"batch": batch, "mask": mask}, accum_steps)

        def accumulate(grad_sum, inputs):
            index, mb = inputs
            rngs = {"dropout": jax.random.fold_in(drop_key, index)}
            (loss, aux), grads = grad_fn(params, mb["batch"], mb["mask"], rngs)
            return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, (losses, auxes) = jax.lax.scan(
            accumulate, zeros, (jnp.arange(accum_steps), micro)
        )
        # Equal microbatches: the mean of their means is the full-batch mean.
        grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
        loss, aux = jnp.mean(losses), jax.tree.map(jnp.mean, auxes)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(step), **aux}
    return {"step": step + 1, "params": params, "opt_state": opt_state}, metrics


def split_microbatches(tree, accum_steps: int):
    """[B, ...] -> [A, B/A, ...] with microbatch i = rows i, A+i, 2A+i, ...

    Reshaping to [B/A, A, ...] and swapping keeps every row on the device that holds it; the
    naive [A, B/A] split would move rows between devices (all-gathers).
    """
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
        tree,
    )


def draw_keep_mask(model, key, batch_size: int):
    """The keep-mask HieraForPreTraining draws itself when given rngs={"mask": key}.

    flax derives the module's `make_rng("mask")` key from `key`; drawing it at the same top-level
    scope reproduces it, so an accumulated step masks each row exactly as an A = 1 step does.
    """
    cfg = model.config

    def draw(module):
        return masking.random_keep_mask(
            module.make_rng("mask"), batch_size, cfg.num_mask_units, cfg.mask_ratio
        )

    return nn.apply(draw, model)({}, rngs={"mask": key})


def model_flops_per_step(step_fn, model, abstract_args, p_train=None) -> float | None:
    """Model FLOPs of one train step: XLA's global count of the step lowered on `abstract_args`.

    Counted without remat (its recompute is not model work) and without accumulation (XLA counts
    a scan body once). Pass `p_train`, the jitted step, when it is that plain step: it is lowered
    itself, and its first call reuses the trace. Call under the mesh. None (with a warning) if
    XLA gives no count.
    """
    try:
        if p_train is None:
            plain_model = model.clone(config=model.config.replace(remat=False))
            plain = functools.partial(step_fn, model=plain_model, accum_steps=1)
            return flops_lib.count_flops(plain, *abstract_args)
        return flops_lib.lowered_flops(p_train.lower(*abstract_args))
    except Exception as e:  # noqa: BLE001 - MFU is a report; never stop training for it
        log.warning("could not count the FLOPs of a train step: %s", e)
        return None


def eval_step(params, batch, key, *, model, task):
    """Sums over the valid rows of one eval batch (the mean is taken on the host at the end)."""
    valid = batch["valid"].astype(jnp.float32)
    if task == "mae":
        _, pred, label, _ = model.apply(
            {"params": params}, batch["image"], train=False, rngs={"mask": key}
        )
        batch_size = batch["image"].shape[0]
        per_example = ((pred - label) ** 2).reshape(batch_size, -1).mean(-1)
        return {"loss": jnp.sum(per_example * valid), "count": jnp.sum(valid)}
    logits = model.apply({"params": params}, batch["image"], train=False)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(loss * valid),
        "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * valid),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * valid),
        "count": jnp.sum(valid),
    }


def reconstruct(params, images, key, *, model):
    _, _, _, _, extra = model.apply(
        {"params": params}, images, train=False, rngs={"mask": key}, return_reconstruction=True
    )
    return extra["pred"], extra["visible"]


# ============================================================================ init from a checkpoint
def local_path(path: str, what: str) -> str:
    """`path`, unless it is a URL: everything here goes through the local filesystem."""
    if "://" in str(path):
        raise ValueError(
            f"{what}={path} is a URL; training reads and writes local paths. Mount the bucket "
            "(e.g. `gcsfuse --implicit-dirs BUCKET /mnt/gcs`) and pass the mounted path."
        )
    return path


def load_encoder(path: str, params: Any) -> tuple[dict, list[str]]:
    """Encoder leaves of a hiera-jax model directory (or a workdir with `model/`), shape-checked.

    Returns ({flat path: np.ndarray} for every encoder leaf of `params`, names left at init).
    """
    path = os.path.abspath(local_path(path, "init_from"))
    candidates = [path, os.path.join(path, "model")]
    directory = next(
        (c for c in candidates if os.path.isfile(os.path.join(c, "config.json"))), None
    )
    if directory is None:
        raise FileNotFoundError(
            f"init_from={path} is neither a hiera-jax model directory (config.json + params/, "
            "from save_pretrained or convert/convert_pytorch.py) nor a finished training workdir "
            "holding model/ (it is written when a run ends)"
        )
    _, source = load_pretrained(directory)
    source = flax.traverse_util.flatten_dict(jax.device_get(source), sep="/")
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


# ============================================================================ the loop
def _steps(config, train_len: int) -> tuple[int, int, float]:
    steps_per_epoch = train_len / config.batch_size
    total = int(config.total_steps) or int(math.ceil(config.num_epochs * steps_per_epoch))
    warmup = int(config.warmup_steps) or int(round(config.warmup_epochs * steps_per_epoch))
    if total <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive number")
    return total, warmup, steps_per_epoch


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
    workdir = os.path.abspath(local_path(workdir, "workdir"))
    os.makedirs(workdir, exist_ok=True)
    task = config.task
    mcfg = hiera_config(config)
    model = build_model(config)
    mesh = sharding.create_mesh(config.mesh_shape, devices)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0

    accum_steps = int(config.grad_accum_steps)
    if accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
    if config.batch_size % (accum_steps * mesh.size):
        raise ValueError(
            f"batch_size {config.batch_size} must be divisible by grad_accum_steps "
            f"{accum_steps} x the {mesh.size} devices of the mesh = {accum_steps * mesh.size} "
            "(every device runs grad_accum_steps equal microbatches)"
        )
    eval_batch = int(config.eval_batch_size) or int(config.batch_size)
    if eval_batch % mesh.size:
        raise ValueError(f"eval_batch_size {eval_batch} must be divisible by {mesh.size} devices")

    # ------------------------------------------------------------------ data
    train_source = data_lib.make_source(config.data, config.data.train_split, mcfg.input_size)
    eval_source = data_lib.make_source(
        config.data, config.data.eval_split, mcfg.input_size, train_source=train_source
    )
    if train_source.channels != mcfg.in_chans:
        log.info("data has %d channels, model %d: converting", train_source.channels, mcfg.in_chans)
    num_classes = mcfg.num_classes
    if (
        task == "classification"
        and getattr(train_source, "num_classes", num_classes) != num_classes
    ):
        raise ValueError(
            f"the dataset has {train_source.num_classes} classes but the model "
            f"num_classes={num_classes}; set --config.model.num_classes"
        )
    with_labels = task == "classification"
    use_tf = isinstance(train_source, tfdata.TfDataSource)
    input_kwargs = dict(
        global_batch=config.batch_size,
        seed=config.seed,
        num_classes=num_classes,
        data_config=config.data,
        with_labels=with_labels,
        process_index=process_index,
        process_count=process_count,
    )
    train_transform = data_lib.Transform(config.data, mcfg.input_size, mcfg.in_chans, train=True)

    def train_input(start_step: int = 0):
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

    train_iter = train_input()
    local_batch = config.batch_size // process_count
    eval_transform = data_lib.Transform(config.data, mcfg.input_size, mcfg.in_chans, train=False)
    # An epoch shows every example once, i.e. `repeated_aug` times with repeated augmentation.
    examples_per_epoch = len(train_source) * max(1, int(config.data.repeated_aug))
    total_steps, warmup_steps, steps_per_epoch = _steps(config, examples_per_epoch)

    # ------------------------------------------------------------------ state, born sharded
    abstract_params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    peak_lr = optim.learning_rate(config.optim.lr, config.batch_size, config.optim.lr_scaling_batch)
    tx, lr_fn = optim.build_optimizer(
        config.optim,
        abstract_params,
        peak_lr=peak_lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        depth=mcfg.depth,
    )

    def init_state(key):
        params = init_params(model, key)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract_state = jax.eval_shape(init_state, jax.random.key(0))
    state_sh = sharding.state_shardings(abstract_state, mesh, config.shard_min_size)
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    train_batch_sh = {"image": batch_sh, **({"label": batch_sh} if with_labels else {})}
    eval_batch_sh = {
        "image": batch_sh,
        "valid": batch_sh,
        **({"label": batch_sh} if with_labels else {}),
    }

    key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(key)
    eval_key = jax.random.fold_in(key, 2**20)
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        lr_fn=lr_fn,
        task=task,
        label_smoothing=float(config.label_smoothing),
        num_classes=num_classes,
        accum_steps=accum_steps,
    )
    with jax.set_mesh(mesh):
        p_init = jax.jit(init_state, out_shardings=state_sh)
        p_train = jax.jit(
            step_fn,
            in_shardings=(state_sh, train_batch_sh, repl),  # state, batch, rng
            out_shardings=(state_sh, repl),
            donate_argnums=(0,),
        )
        p_eval = jax.jit(
            functools.partial(eval_step, model=model, task=task),
            in_shardings=(state_sh["params"], eval_batch_sh, repl),
            out_shardings=repl,
        )
        p_recon = jax.jit(
            functools.partial(reconstruct, model=model),
            in_shardings=(state_sh["params"], batch_sh, repl),
            out_shardings=repl,
        )
        # Model FLOPs per step for MFU, from p_train's arguments as shapes (as the loop passes them).
        batch_shapes = {"image": (config.batch_size, *mcfg.input_size, mcfg.in_chans)}
        if with_labels:
            batch_shapes["label"] = (config.batch_size, num_classes)
        train_args = (
            jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                abstract_state,
                state_sh,
            ),
            {
                k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=batch_sh)
                for k, v in batch_shapes.items()
            },
            jax.ShapeDtypeStruct(train_key.shape, train_key.dtype),  # as the loop passes it
        )
        plain = not mcfg.remat and accum_steps == 1  # p_train is the step to count
        flops_per_step = model_flops_per_step(
            step_fn, model, train_args, p_train if plain else None
        )
    peak_flops = flops_lib.peak_flops_per_device(
        mesh.devices.flat[0].device_kind, float(config.peak_flops_per_device)
    )

    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    meta_base = {"task": task, "model": mcfg.to_dict(), "config": config.to_json()}
    latest = ckpt.latest_step()
    notes = [f"ignored unfinished checkpoint {ckpt_dir}/{name}" for name in ckpt.partial]
    with jax.set_mesh(mesh):
        if latest is not None:
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                abstract_state,
                state_sh,
            )
            state, _ = ckpt.restore(latest, target)
            notes.append(f"resumed from {ckpt_dir}/{latest}")
            if not ckpt.restore_data(latest, train_iter):
                notes.append("no saved input state for this process layout: input from the step")
                train_iter.close()
                train_iter = train_input(latest)
            resumed_from = latest
        else:
            state = p_init(init_key)
            resumed_from = None
            if config.init_from:
                loaded, kept = load_encoder(config.init_from, abstract_state["params"])
                flat = flax.traverse_util.flatten_dict(state["params"], sep="/")
                flat_sh = flax.traverse_util.flatten_dict(state_sh["params"], sep="/")
                for name, value in loaded.items():
                    flat[name] = jax.device_put(value, flat_sh[name])
                state["params"] = flax.traverse_util.unflatten_dict(flat, sep="/")
                notes.append(
                    f"initialised {len(loaded)} encoder tensors from {config.init_from}; "
                    f"fresh init for {', '.join(kept)}"
                )
    start_step = int(jax.device_get(state["step"]))

    logger = MetricLogger(
        workdir,
        total_steps=total_steps,
        start_step=start_step,
        enabled=is_main,
        hparams=config.to_dict(),
        progress=progress,
    )
    for note in notes:
        logger.print(note)
    n_params = optim.count_params(abstract_state["params"])
    batch_text = f"batch {config.batch_size}"
    if accum_steps > 1:
        batch_text += f" as {accum_steps} microbatches"
    if flops_per_step:
        batch_text += f", {flops_per_step / 1e9:.3g} GFLOP/step"
        if peak_flops:
            batch_text += f" (MFU against {peak_flops / 1e12:.3g} TFLOP/s/device)"
    logger.print(
        f"{task}: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, {batch_text}, "
        f"{total_steps} steps ({steps_per_epoch:.1f}/epoch), peak lr {peak_lr:.3g}, "
        + (
            f"resumed at step {start_step}"
            if resumed_from is not None
            else "from scratch"
            if not config.init_from
            else f"encoder from {config.init_from}"
        )
    )

    pictures_dir = os.path.join(workdir, "pictures")
    vis_images = None
    if task == "mae" and config.num_vis > 0:
        os.makedirs(pictures_dir, exist_ok=True)
        n_vis = min(int(config.num_vis), len(eval_source))
        vis = [eval_transform(im, None) for im in data_lib.first_images(eval_source, n_vis)]
        padded = -(-n_vis // mesh.size) * mesh.size
        vis += [vis[0]] * (padded - n_vis)
        vis_images = np.stack(vis).astype(np.float32)

    def evaluate(params, step) -> dict[str, float]:
        sums: dict[str, float] = {}
        batches = (tfdata if use_tf else pipeline).eval_batches(
            eval_source,
            eval_transform,
            global_batch=eval_batch,
            max_examples=int(config.eval_max_examples),
            with_labels=with_labels,
            process_index=process_index,
            process_count=process_count,
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
                images = jax.device_put(vis_images, batch_sh)
                pred, visible = jax.device_get(p_recon(params, images, eval_key))
                if is_main:
                    n = min(int(config.num_vis), len(eval_source))
                    path = os.path.join(pictures_dir, f"reconstruction_{step:06d}.png")
                    visualize.save_reconstruction_png(
                        path,
                        vis_images[:n],
                        pred[:n],
                        visible[:n],
                        mcfg,
                        config.data.mean,
                        config.data.std,
                    )
                    shutil.copyfile(path, os.path.join(pictures_dir, "latest.png"))
        return result

    # ------------------------------------------------------------------ train
    stop = StopSignal()
    history: list[dict[str, float]] = []
    last_eval: dict[str, float] = {}
    step = start_step
    stopped_early = False
    try:
        t0, t0_step = time.time(), step
        while step < total_steps:
            local = next(train_iter)
            if step == start_step:  # the restored input is where the restored state is
                pipeline.check_position(local, step, config.batch_size, process_index * local_batch)
            del local["position"]
            with jax.set_mesh(mesh):
                batch = sharding.global_batch(local, mesh)
                with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
                    state, metrics = p_train(state, batch, train_key)
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
                metrics["epoch"] = step / steps_per_epoch
                logger.write("train", step, metrics)
                history.append({"step": step, **metrics})
            logger.advance(step)

            preempted = stop.requested or (process_count > 1 and ckpt.reached_preemption(step))
            is_last = step == total_steps
            if (
                (config.checkpoint_every > 0 and step % config.checkpoint_every == 0)
                or is_last
                or preempted
            ):
                ckpt.save(step, state, {**meta_base, "step": step}, data_iterator=train_iter)
            if preempted:
                ckpt.wait()
                logger.print(
                    f"stopped by signal at step {step}; checkpoint saved to {ckpt_dir}/{step}"
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
        ckpt.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
        logger.close()

    summary: dict[str, Any] = {
        "step": step,
        "history": history,
        "eval": last_eval,
        "stopped_early": stopped_early,
        "resumed_from": resumed_from,
        "workdir": workdir,
        "checkpoint_dir": ckpt_dir,
        "pictures_dir": pictures_dir if vis_images is not None else None,
        "metrics_file": os.path.join(workdir, "metrics.jsonl"),
        "model_dir": None,
        "flops_per_step": flops_per_step,
        "mfu": history[-1].get("mfu") if history else None,  # of the last logged interval
    }
    final_params = None
    if (config.export_model and not stopped_early) or return_params:
        if process_count > 1:
            from jax.experimental import multihost_utils

            final_params = multihost_utils.process_allgather(state["params"], tiled=True)
        else:
            final_params = jax.device_get(state["params"])
    if config.export_model and not stopped_early:
        model_type = "pretraining" if task == "mae" else "classification"
        summary["model_dir"] = save_pretrained(
            os.path.join(workdir, "model"),
            final_params,
            mcfg,
            model_type=model_type,
            preprocessing={"mean": config.data.mean, "std": config.data.std},
        )
    if return_params:
        summary["params"] = final_params
    if return_state:
        summary["state"] = state  # the live, sharded arrays (tests check their shardings)
        summary["mesh"] = mesh
    return summary
