"""The pure step functions a run jits: the train step (with gradient accumulation), eval, MAE
reconstruction. Each takes its model and options as keywords, so `functools.partial` binds them
and `jax.jit` sees (state, batch, key) alone."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hiera_jax.models import masking


def train_step(
    state, batch, key, *, model, tx, lr_fn, task, label_smoothing, num_classes, accum_steps=1
):
    """One optimizer step: (state, batch, key) -> (state, metrics). Randomness: fold_in(key, step).

    With accum_steps A > 1 the batch runs as A microbatches, one after another (`lax.scan`), and
    their averaged gradient makes one update. Microbatch i holds rows i, A+i, 2A+i, ... so every
    device keeps its own rows (a contiguous split would move rows between devices). MAE draws the keep-mask for the whole batch first,
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
