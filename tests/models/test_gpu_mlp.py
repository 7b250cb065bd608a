"""The MLP half's GPU kernels (hiera_jax.models.kernels.gpu_mlp): Pallas Triton kernels, run here in
Pallas' interpreter against torch's float64 autograd and XLA's path, and compiled for an H100
without a GPU to check that 16-bit GPU programs take them and move fewer bytes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import rel_err
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_fused_mlp import EPS, _inputs, _torch_float64

from hiera_jax.models.kernels import fused_mlp, gpu_mlp
from hiera_jax.training.cost import aot, hlo_cost


def _factor(keep, keep_scale, batch):
    if keep is None:
        return jnp.ones((batch, 1, 1), jnp.float32)
    return jnp.where(keep, 1.0 / keep_scale, 0.0).astype(jnp.float32).reshape(-1, 1, 1)


def _value_and_grads(x, p, keep, keep_scale, dout, kernel: bool):
    factor = _factor(keep, keep_scale, x.shape[0])

    def f(x, p):
        if kernel:
            return gpu_mlp.mlp_half(x, factor, p, EPS, True)  # interpreted
        return fused_mlp.xla_mlp_half(x, p, EPS, keep, keep_scale)

    out, vjp = jax.vjp(f, x, p)
    dx, dp = vjp(dout.astype(out.dtype))
    return out, [dx, *dp]


def test_erf_is_within_float32_rounding_of_the_exact_function():
    xs = np.linspace(-7, 7, 20001, dtype=np.float32)
    want = np.array([math.erf(float(v)) for v in xs])
    assert np.abs(np.asarray(gpu_mlp.erf(jnp.asarray(xs))) - want).max() < 5e-7


@pytest.mark.parametrize(
    "shape, hidden", [((4, 16, 96), 384), ((2, 32, 144), 576), ((16, 49, 32), 128)]
)
def test_kernels_match_float64_in_float32(shape, hidden):
    """C in chunks of 32 (Hiera's 96), of 16 (144: Hiera-L), rows in tiles of 16 over images
    of 49 tokens (tiles of 16 rows cross images, so the drop path is per row)."""
    x, p, keep, dout = _inputs(shape, hidden)
    want, want_grads = _torch_float64(x, p, keep, 0.7, dout)
    out, grads = _value_and_grads(x, p, keep, 0.7, dout, kernel=True)
    assert rel_err(out, want) < 1e-5
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) < 1e-5


def test_kernels_without_drop_path_and_with_every_example_dropped():
    x, p, _, dout = _inputs((2, 64, 32), 128)
    for keep in (None, jnp.zeros((2, 1, 1), bool)):
        ours = _value_and_grads(x, p, keep, 0.5, dout, kernel=True)
        xla = _value_and_grads(x, p, keep, 0.5, dout, kernel=False)
        for got, want in zip([ours[0], *ours[1]], [xla[0], *xla[1]]):
            if np.abs(np.asarray(want)).max() == 0:
                np.testing.assert_array_equal(got, want)
            else:
                assert rel_err(got, want) < 1e-5
    dropped = _value_and_grads(x, p, jnp.zeros((2, 1, 1), bool), 0.5, dout, kernel=True)
    np.testing.assert_array_equal(dropped[0], x)


def test_kernels_in_bfloat16_are_as_close_to_float64_as_xla_in_bfloat16():
    x, p, keep, dout = _inputs((4, 196, 32), 128, jnp.bfloat16)
    want, want_grads = _torch_float64(x, p, keep, 0.7, dout)
    errors = {}
    for kernel in (True, False):
        out, grads = _value_and_grads(x, p, keep, 0.7, dout, kernel=kernel)
        errors[kernel] = [rel_err(out, want)] + [rel_err(g, w) for g, w in zip(grads, want_grads)]
    for ours, xla in zip(errors[True], errors[False]):
        assert ours <= 1.25 * xla + 1e-3, errors


def test_kernels_run_per_device_under_a_mesh_and_sum_weight_gradients():
    x, p, keep, dout = _inputs((4, 16, 32), 128)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))  # as training builds it
    whole = _value_and_grads(x, p, keep, 0.7, dout, kernel=True)
    run = jax.jit(lambda x, dout: _value_and_grads(x, p, keep, 0.7, dout, kernel=True))
    with jax.set_mesh(mesh):
        split = jax.device_put((x, dout), NamedSharding(mesh, P("data")))
        sharded = run(*split)
        # Each device ran the kernels on its half of the batch (no all-gather of x).
        hlo = run.lower(*split).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo
    for got, want in zip([sharded[0], *sharded[1]], [whole[0], *whole[1]]):
        assert rel_err(got, want) < 1e-6


def _gpu_text(dtype, kernel="auto"):
    x, p, keep, _ = _inputs((8, 196, 96), 384)
    device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    x = jax.ShapeDtypeStruct(x.shape, dtype, sharding=device)
    p = fused_mlp.MlpHalf(
        *(jax.ShapeDtypeStruct(a.shape, a.dtype if i < 2 else dtype, sharding=device)
          for i, a in enumerate(p))
    )  # fmt: skip

    def step(x, p):
        out, vjp = jax.vjp(lambda x, p: fused_mlp.mlp_half(x, p, EPS, kernel=kernel), x, p)
        return vjp(out)

    return jax.jit(step).trace(x, p).lower().compile(aot.GPU_COMPILE_OPTIONS).as_text()


def test_gpu_programs_take_the_kernels_in_16_bits_and_move_fewer_bytes():
    pytest.importorskip("jax_plugins.xla_cuda12", reason="the GPU compiler: the gpu extra")
    ours = _gpu_text(jnp.bfloat16)
    for name in ("hiera_mlp_half_fwd", "hiera_mlp_half_bwd", "hiera_mlp_half_wgrad"):
        assert name in ours
    assert ours.count('custom_call_target="__gpu$xla.gpu.triton"') == 3
    # The weight gradients come from the kernel, not from cuBLAS over a written activation.
    xla = _gpu_text(jnp.bfloat16, kernel="xla")
    assert "__cublas" not in ours and "__cublas" in xla
    assert "hiera_mlp_half" not in xla
    assert hlo_cost.bytes_accessed(ours) < 0.25 * hlo_cost.bytes_accessed(xla)
    assert "hiera_mlp_half" not in _gpu_text(jnp.float32)  # float32: XLA's path


def test_shapes_the_kernels_cannot_tile_keep_xla():
    bf16 = jnp.bfloat16
    assert gpu_mlp.kernel_fits(jnp.zeros((64, 196, 384), bf16), jnp.zeros((384, 1536), bf16))
    assert not gpu_mlp.kernel_fits(jnp.zeros((1, 49, 96), bf16), jnp.zeros((96, 384), bf16))
    assert not gpu_mlp.kernel_fits(jnp.zeros((4, 16, 24), bf16), jnp.zeros((24, 96), bf16))
    assert not gpu_mlp.kernel_fits(jnp.zeros((4, 16, 96), bf16), jnp.zeros((96, 100), bf16))
    assert not gpu_mlp.kernel_fits(jnp.zeros((4, 16, 96)), jnp.zeros((96, 384)))
    # Hiera-H's last stage: Triton would need more shared memory than an SM has.
    assert not gpu_mlp.kernel_fits(jnp.zeros((64, 49, 2048), bf16), jnp.zeros((2048, 8192), bf16))
    assert gpu_mlp.kernel_fits(jnp.zeros((64, 49, 1152), bf16), jnp.zeros((1152, 4608), bf16))
