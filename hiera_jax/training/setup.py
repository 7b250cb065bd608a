"""What a run builds before it reads data or allocates state: model, optimizer, mesh shardings and
the jitted train step, as one `TrainSetup`.

`train_and_evaluate` and the ahead-of-time fit check (`aot.py`) both start here, so the program
the fit check compiles for a TPU slice is the one a real run on that slice would compile.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from hiera_jax.models.factory import init_params
from hiera_jax.models.scan import use_scan
from hiera_jax.training import optim, sharding
from hiera_jax.training.config import build_model, resolve_model_config
from hiera_jax.training.cost import flops as flops_lib
from hiera_jax.training.steps import train_step

log = logging.getLogger(__name__)

# HieraConfig switches that change how a step computes, not what: XLA's FLOP count includes
# remat's recompute and counts a scanned (`lax.scan`) body once, so model FLOPs are counted with
# them off.
EXECUTION_SWITCHES = ("remat", "scan_blocks")


def check_batching(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[int, int]:
    """(grad_accum_steps, eval batch size), or ValueError if the batch does not split evenly."""
    accum_steps = int(config.grad_accum_steps)
    if accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
    if config.batch_size < 1 or config.batch_size % (accum_steps * mesh.size):
        raise ValueError(
            f"batch_size {config.batch_size} must be a positive multiple of grad_accum_steps "
            f"{accum_steps} x the {mesh.size} devices of the mesh = {accum_steps * mesh.size} "
            "(every device runs grad_accum_steps equal microbatches)"
        )
    eval_batch = int(config.eval_batch_size) or int(config.batch_size)
    if eval_batch < 1 or eval_batch % mesh.size:
        raise ValueError(
            f"eval_batch_size {eval_batch} must be a positive multiple of the {mesh.size} devices"
        )
    return accum_steps, eval_batch


def schedule_steps(config: ml_collections.ConfigDict, examples_per_epoch: int) -> tuple[int, int]:
    """(total steps, warmup steps): total_steps/warmup_steps > 0 win over the epoch counts."""
    steps_per_epoch = examples_per_epoch / config.batch_size
    total = int(config.total_steps) or int(math.ceil(config.num_epochs * steps_per_epoch))
    warmup = int(config.warmup_steps) or int(round(config.warmup_epochs * steps_per_epoch))
    if total <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive number")
    return total, warmup


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Model, optimizer, shardings and the step function of one run on one mesh."""

    config: ml_collections.ConfigDict
    model_config: Any  # the family's config: HieraConfig, HieraDetConfig
    model: Any  # HieraForPreTraining, HieraForImageClassification, HieraDetForImageClassification
    mesh: Mesh
    accum_steps: int
    eval_batch: int
    total_steps: int
    warmup_steps: int
    examples_per_epoch: int
    peak_lr: float
    tx: optax.GradientTransformation
    lr_fn: Any
    abstract_state: Any  # {"step", "params", "opt_state"} as ShapeDtypeStructs
    state_sh: Any  # NamedShardings, the same tree
    step_fn: Any  # train_step with everything but (state, batch, key) bound

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def with_labels(self) -> bool:
        return self.task == "classification"

    @property
    def steps_per_epoch(self) -> float:
        return self.examples_per_epoch / self.config.batch_size

    @property
    def batch_sh(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)

    @property
    def repl(self) -> NamedSharding:
        return sharding.replicated(self.mesh)

    @property
    def train_batch_sh(self) -> dict[str, NamedSharding]:
        return {"image": self.batch_sh, **({"label": self.batch_sh} if self.with_labels else {})}

    @property
    def eval_batch_sh(self) -> dict[str, NamedSharding]:
        return {**self.train_batch_sh, "valid": self.batch_sh}

    def init_state(self, key):
        params = init_params(self.model, key)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": self.tx.init(params),
        }

    def abstract_sharded_state(self) -> Any:
        """The state as ShapeDtypeStructs carrying their shardings (restore and lowering targets)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_sh,
        )

    def abstract_train_args(self, key: jax.Array | None = None) -> tuple:
        """(state, batch, key) of the train step as shapes, sharded as the loop passes them."""
        model_config, batch = self.model_config, self.config.batch_size
        shapes = {"image": (batch, *model_config.input_size, model_config.in_chans)}
        if self.with_labels:
            shapes["label"] = (batch, model_config.num_classes)
        key = jax.eval_shape(lambda: jax.random.key(0)) if key is None else key  # nothing runs
        return (
            self.abstract_sharded_state(),
            {
                k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=self.batch_sh)
                for k, v in shapes.items()
            },
            jax.ShapeDtypeStruct(key.shape, key.dtype),  # uncommitted, as the loop passes it
        )

    def jit_train_step(self):
        """The train step jitted with state shardings in and out and the state donated."""
        return jax.jit(
            self.step_fn,
            in_shardings=(self.state_sh, self.train_batch_sh, self.repl),  # state, batch, rng
            out_shardings=(self.state_sh, self.repl),
            donate_argnums=(0,),
        )

    @property
    def is_plain_step(self) -> bool:
        """True when the jitted step has no execution switch on and no accumulation (XLA's count
        of it is the model FLOPs)."""
        switches = bool(self.model_config.remat) or use_scan(self.model_config)
        return not switches and self.accum_steps == 1

    def plain_step_fn(self):
        """The step without execution switches and accumulation: what model FLOPs are counted on."""
        off = {f: False for f in EXECUTION_SWITCHES if hasattr(self.model_config, f)}
        return self._whole_batch_step(**off)

    def unlooped_step_fn(self):
        """The step as it runs (remat as configured) with its loops opened: blocks unscanned and
        no accumulation. XLA counts a loop body once, so this is what counts the FLOPs a looped
        step executes, remat's recompute included."""
        return self._whole_batch_step(scan_blocks=False)

    def _whole_batch_step(self, **model_fields):
        """The step on the whole batch at once, its model's config fields replaced (those it has:
        HieraDet has no scan_blocks)."""
        model_fields = {k: v for k, v in model_fields.items() if hasattr(self.model_config, k)}
        model = self.model.clone(config=self.model_config.replace(**model_fields))
        keywords = {**self.step_fn.keywords, "model": model, "accum_steps": 1}
        return functools.partial(self.step_fn.func, **keywords)


def build_setup(
    config: ml_collections.ConfigDict, mesh: Mesh, examples_per_epoch: int, model_config: Any = None
) -> TrainSetup:
    """Everything but data and state for `config` on `mesh`; no device memory is touched.
    `model_config`: the run's model config, where the caller resolved it already."""
    model_config = (
        resolve_model_config(config) if model_config is None else model_config
    )  # then everything reads setup.model_config
    model = build_model(config, model_config)
    accum_steps, eval_batch = check_batching(config, mesh)
    total_steps, warmup_steps = schedule_steps(config, examples_per_epoch)
    abstract_params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    peak_lr = optim.learning_rate(config.optim.lr, config.batch_size, config.optim.lr_scaling_batch)
    tx, lr_fn = optim.build_optimizer(
        config.optim,
        abstract_params,
        peak_lr=peak_lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        depth=model_config.depth,
    )
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        lr_fn=lr_fn,
        task=config.task,
        label_smoothing=float(config.label_smoothing),
        num_classes=model_config.num_classes,
        accum_steps=accum_steps,
    )
    setup = TrainSetup(
        config=config,
        model_config=model_config,
        model=model,
        mesh=mesh,
        accum_steps=accum_steps,
        eval_batch=eval_batch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        examples_per_epoch=examples_per_epoch,
        peak_lr=peak_lr,
        tx=tx,
        lr_fn=lr_fn,
        abstract_state=None,
        state_sh=None,
        step_fn=step_fn,
    )
    abstract_state = jax.eval_shape(setup.init_state, jax.random.key(0))
    state_sh = sharding.state_shardings(abstract_state, mesh, config.shard_min_size)
    return dataclasses.replace(setup, abstract_state=abstract_state, state_sh=state_sh)


def unsharded(tree: Any) -> Any:
    """ShapeDtypeStructs without shardings (for a global, single-device lowering)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def model_flops_per_step(setup: TrainSetup, train_args: tuple, p_train=None) -> float | None:
    """Model FLOPs of one train step (global): XLA's count of the plain step on `train_args`.

    Counted without remat (its recompute is not model work) and without accumulation (XLA counts
    a scan body once). On a CPU mesh: the step lowered here. Elsewhere the plain step lowered for
    the CPU (tracing only, no compile: the same program, so the same arithmetic), because TPU
    gives no count for a lowered program and GPU gave a wrong one; then the matmul FLOPs of the
    step's jaxpr (no backend involved); last, the compiled step's per-device count times the
    devices (it counts remat recompute and, on GPU, misses library GEMMs). Call under the mesh.
    None (with a warning) if all fail.
    """
    try:
        plain_args = unsharded(train_args)
        on_cpu = setup.mesh.devices.flat[0].platform == "cpu"
        count, lowered = None, None
        if on_cpu and setup.is_plain_step:
            p_train = p_train if p_train is not None else setup.jit_train_step()
            lowered = p_train.lower(*train_args)
            count = flops_lib.lowered_flops(lowered)
        if count is None:  # lowered here above if the step is plain
            here = on_cpu and not setup.is_plain_step
            count = flops_lib.model_flops(setup.plain_step_fn(), *plain_args, here=here)
        if count is None and setup.is_plain_step:
            p_train = p_train if p_train is not None else setup.jit_train_step()
            lowered = lowered or p_train.lower(*train_args)
            count = flops_lib.compiled_flops(lowered.compile(), setup.mesh.size)
        return count
    except Exception as e:  # noqa: BLE001 - MFU is a report; never stop training for it
        log.warning("could not count the FLOPs of a train step: %s", e)
        return None
