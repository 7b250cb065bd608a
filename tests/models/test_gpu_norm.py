"""The GPU LayerNorm backward (`kernels.gpu_norm`): its gradients against XLA's autodiff of the
same norm in float32, where it is taken, and the bytes it saves in a program compiled for a GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import rel_err

from hiera_jax.models.kernels import gpu_norm
from hiera_jax.training.cost import aot, hlo_cost

EPS = 1e-6


def _inputs(shape, mean=0.5, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    channels = shape[-1]
    x = jax.random.normal(k[0], shape) * 2.0 + mean
    scale = 1.0 + 0.1 * jax.random.normal(k[1], (channels,))
    bias = 0.1 * jax.random.normal(k[2], (channels,))
    dout = jax.random.normal(k[3], shape)
    return x, scale, bias, dout


def _grads(norm, x, scale, bias, dout):
    out, vjp = jax.vjp(lambda x, s, b: norm(x, s, b, EPS, x.dtype), x, scale, bias)
    return (out, *vjp(dout.astype(out.dtype)))


@pytest.mark.parametrize("shape", [(2, 49, 96), (3, 7, 16, 384)])
@pytest.mark.parametrize("mean", [0.5, 300.0])
def test_backward_matches_xlas_autodiff_in_float32(shape, mean):
    """Values and the three gradients, a mean far above the spread included (the one-pass
    variance is shifted, so it does not cancel)."""
    args = _inputs(shape, mean)
    want = _grads(gpu_norm.xla_norm, *args)
    got = _grads(gpu_norm.gpu_layer_norm, *args)
    assert np.array_equal(got[0], want[0])  # the forward is XLA's own
    for g, w in zip(got[1:], want[1:]):
        assert rel_err(g, w) < 2e-5, (rel_err(g, w), shape, mean)


def test_bfloat16_gradients_are_as_close_to_float32_as_xlas():
    x, scale, bias, dout = _inputs((4, 196, 192))
    exact = _grads(gpu_norm.xla_norm, x, scale, bias, dout)[1:]
    x16 = x.astype(jnp.bfloat16)
    ours = _grads(gpu_norm.gpu_layer_norm, x16, scale, bias, dout)[1:]
    xla = _grads(gpu_norm.xla_norm, x16, scale, bias, dout)[1:]
    for o, a, e in zip(ours, xla, exact):
        assert rel_err(o.astype(jnp.float32), e) < 1.5 * rel_err(a.astype(jnp.float32), e) + 1e-3


def test_dispatch_keeps_xla_off_gpu_in_float32_and_when_asked():
    x, scale, bias, _ = _inputs((2, 8, 32))
    for dtype, kernel in [(jnp.float32, "auto"), (jnp.bfloat16, "xla")]:
        norm = functools.partial(
            gpu_norm.layer_norm, scale=scale, bias=bias, eps=EPS, dtype=dtype, kernel=kernel
        )
        jaxpr = str(jax.make_jaxpr(norm)(x.astype(dtype)))
        assert "custom_vjp" not in jaxpr and "platform_index" not in jaxpr
    auto = functools.partial(
        gpu_norm.layer_norm, scale=scale, bias=bias, eps=EPS, dtype=jnp.bfloat16
    )
    assert "platform_index" in str(jax.make_jaxpr(auto)(x.astype(jnp.bfloat16)))
    # bf16 on this CPU: the program's default branch, XLA's norm, value for value.
    x16 = x.astype(jnp.bfloat16)
    got = jax.jit(lambda x: gpu_norm.layer_norm(x, scale, bias, EPS, jnp.bfloat16))(x16)
    assert np.array_equal(got, gpu_norm.xla_norm(x16, scale, bias, EPS, jnp.bfloat16))
    with pytest.raises(ValueError, match="norm kernel"):
        gpu_norm.layer_norm(x, scale, bias, EPS, jnp.float32, "triton")


def _gpu_program(kernel: str) -> str:
    """A norm's forward and backward in a block's setting (the residual stream's gradient added
    to dx), compiled for one H100 without a GPU: the optimized program."""
    device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    tokens, vector = ((64, 784, 192), jnp.bfloat16), ((192,), jnp.float32)
    shapes = [tokens, vector, vector, tokens, tokens]
    args = [jax.ShapeDtypeStruct(s, d, sharding=device) for s, d in shapes]

    def step(x, scale, bias, dout, dresidual):
        def f(x, scale, bias):
            return gpu_norm.layer_norm(x, scale, bias, EPS, jnp.bfloat16, kernel)

        out, vjp = jax.vjp(f, x, scale, bias)
        dx, dscale, dbias = vjp(dout)
        return out, dx + dresidual, dscale, dbias

    return jax.jit(step).trace(*args).lower().compile(aot.GPU_COMPILE_OPTIONS).as_text()


def _full_size_f32(text: str) -> list[str]:
    """Instructions of the entry computation that write a float32 array of x's size."""
    entry = text.split("ENTRY", 1)[1]
    return [
        ln for ln in entry.splitlines() if " = f32[64,784,192]" in ln or " = f32[50176,192]" in ln
    ]


def test_gpu_program_takes_the_path_and_moves_fewer_bytes():
    pytest.importorskip("jax_plugins.xla_cuda12", reason="the GPU compiler: the gpu extra")
    ours, xla = _gpu_program("auto"), _gpu_program("xla")
    assert "optimization_barrier" in ours and "optimization_barrier" not in xla
    assert _full_size_f32(xla) and not _full_size_f32(ours)  # XLA's x̂·dy in float32
    x_bytes = 64 * 784 * 192 * 2
    saved = hlo_cost.bytes_accessed(xla) - hlo_cost.bytes_accessed(ours)
    assert saved > 2 * x_bytes, saved / x_bytes
