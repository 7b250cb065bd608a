"""The MFU report's two inputs: XLA's FLOP count of a step, and the peak FLOP/s of a chip."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import train as th

from hiera_jax.models.scan import use_scan
from hiera_jax.training import sharding
from hiera_jax.training.cost import flops
from hiera_jax.training.setup import (
    EXECUTION_SWITCHES,
    build_setup,
    model_flops_per_step,
    unsharded,
)


def test_xla_counts_a_matmul_as_two_multiply_adds_per_output():
    m, k, n = 64, 128, 32
    a = jax.ShapeDtypeStruct((m, k), jnp.float32)
    b = jax.ShapeDtypeStruct((k, n), jnp.float32)
    assert flops.count_flops(jnp.matmul, a, b) == 2 * m * k * n


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),  # v5e
        ("TPU v5", 459e12),  # v5p
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),  # v6e
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("cpu", None),  # unknown: TFLOP/s are logged, MFU is not
    ],
)
def test_peak_flops_by_device_kind(kind, peak):
    assert flops.peak_flops_per_device(kind) == peak


def test_peak_flops_override_wins():
    assert flops.peak_flops_per_device("cpu", 5e12) == 5e12
    assert flops.peak_flops_per_device("TPU v4", 1e14) == 1e14


@pytest.mark.parametrize("remat", [False, True])
def test_train_step_counts_about_three_forwards(remat):
    """Backward costs about twice the forward; remat recompute and Adam are not model work."""
    config = th.make_config("mae", th.overrides(model__remat=remat))
    mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
    setup = build_setup(config, mesh, examples_per_epoch=1000)
    assert setup.is_plain_step == (not remat and not use_scan(setup.model_config))
    with jax.set_mesh(mesh):
        step_flops = model_flops_per_step(setup, setup.abstract_train_args())
    # The forward counted unscanned too: XLA counts a scanned body once.
    off = {f: False for f in EXECUTION_SWITCHES if hasattr(setup.model_config, f)}
    model = setup.model.clone(config=setup.model_config.replace(**off))
    image = jax.ShapeDtypeStruct(
        (config.batch_size, *model.config.input_size, model.config.in_chans), "float32"
    )
    params = setup.abstract_state["params"]

    def forward(params, x, key):
        return model.apply({"params": params}, x, train=True, rngs={"mask": key})[0]

    forward_flops = flops.count_flops(forward, params, image, jax.random.key(0))
    assert step_flops and forward_flops
    assert 2.6 < step_flops / forward_flops < 3.4, (step_flops, forward_flops)


@pytest.mark.parametrize("task", ["mae", "classification"])
def test_jaxpr_count_matches_xla_on_the_matmuls_and_sees_through_scans(task):
    """The backend-free count (GPU's fallback): a few percent under XLA's count of the same
    plain step (elementwise work is left out), and the same with the blocks scanned."""
    config = th.make_config(task)
    mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
    setup = build_setup(config, mesh, examples_per_epoch=1000)
    args = unsharded(setup.abstract_train_args())
    plain = setup.plain_step_fn()
    xla = flops.count_flops(plain, *args)
    counted = flops.jaxpr_flops(plain, *args)
    assert 0.85 * xla < counted <= xla, (counted, xla)
    scanned_model = setup.model.clone(config=setup.model_config.replace(scan_blocks=True))
    scanned = functools.partial(plain.func, **{**plain.keywords, "model": scanned_model})
    assert flops.jaxpr_flops(scanned, *args) == pytest.approx(counted, rel=1e-6)


def test_jaxpr_count_of_a_matmul_and_a_grouped_conv():
    a = jax.ShapeDtypeStruct((8, 64, 128), jnp.float32)
    b = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    assert flops.jaxpr_flops(jnp.matmul, a, b) == 2 * 8 * 64 * 128 * 32
    x = jax.ShapeDtypeStruct((2, 16, 16, 12), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 4, 24), jnp.float32)  # 3 groups of 4 input channels

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=3,
        )

    assert flops.jaxpr_flops(conv, x, w) == flops.count_flops(conv, x, w)
