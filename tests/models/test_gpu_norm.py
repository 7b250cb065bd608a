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


@pytest.mark.parametrize("backward", ["interpret", "xla"])
@pytest.mark.parametrize("shape", [(2, 64, 96), (3, 7, 16, 384), (2, 49, 96)])
@pytest.mark.parametrize("mean", [0.5, 300.0])
def test_backward_matches_xlas_autodiff_in_float32(shape, mean, backward):
    """Values and the three gradients, through the Triton kernel (interpreted) and through
    XLA's ops, a mean far above the spread included (the one-pass variance of XLA's ops is
    shifted, so it does not cancel); 98 rows tile with no power of two: XLA's ops either way."""
    args = _inputs(shape, mean)
    want = _grads(gpu_norm.xla_norm, *args)
    norm = functools.partial(gpu_norm.gpu_layer_norm, backward=backward)
    got = _grads(norm, *args)
    assert np.array_equal(got[0], want[0])  # the forward is XLA's own
    for g, w in zip(got[1:], want[1:]):
        assert rel_err(g, w) < 2e-5, (rel_err(g, w), shape, mean)
    assert gpu_norm.kernel_fits(args[0]) == (shape[1] != 49)


@pytest.mark.parametrize("backward", ["interpret", "xla"])
def test_norm_and_input_adds_the_residual_gradient_to_dx(backward):
    """(x, norm(x)) for a pre-norm block: dx is the residual stream's gradient plus the norm's,
    as XLA's autodiff of the same pair gives, through the kernel and through XLA's ops."""
    x, scale, bias, dout = _inputs((2, 64, 96))
    dres = jax.random.normal(jax.random.key(5), x.shape)

    def grads(pair):
        out, vjp = jax.vjp(lambda x, s, b: pair(x, s, b, EPS, x.dtype), x, scale, bias)
        return (*out, *vjp((dres, dout)))

    want = grads(lambda x, s, b, eps, dtype: (x, gpu_norm.xla_norm(x, s, b, eps, dtype)))
    got = grads(functools.partial(gpu_norm.gpu_layer_norm_and_input, backward=backward))
    assert np.array_equal(got[0], x) and np.array_equal(got[1], want[1])
    for g, w in zip(got[2:], want[2:]):
        assert rel_err(g, w) < 2e-5, rel_err(g, w)


def test_bfloat16_gradients_are_as_close_to_float32_as_xlas():
    x, scale, bias, dout = _inputs((4, 196, 192))
    exact = _grads(gpu_norm.xla_norm, x, scale, bias, dout)[1:]
    x16 = x.astype(jnp.bfloat16)
    kernel = functools.partial(gpu_norm.gpu_layer_norm, backward="interpret")
    ours = _grads(kernel, x16, scale, bias, dout)[1:]
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


def _gpu_program(kernel: str, channels: int = 192, with_input: bool = False) -> str:
    """A norm's forward and backward in a block's setting (the residual stream's gradient added
    to dx), compiled for one H100 without a GPU: the optimized program."""
    device = jax.sharding.SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    tokens, vector = ((64, 784, channels), jnp.bfloat16), ((channels,), jnp.float32)
    shapes = [tokens, vector, vector, tokens, tokens]
    args = [jax.ShapeDtypeStruct(s, d, sharding=device) for s, d in shapes]

    def step(x, scale, bias, dout, dresidual):
        def f(x, scale, bias):
            return gpu_norm.layer_norm(x, scale, bias, EPS, jnp.bfloat16, kernel, with_input)

        out, vjp = jax.vjp(f, x, scale, bias)
        if with_input:  # the residual's gradient goes in with the norm's
            dx, dscale, dbias = vjp((dresidual, dout))
            return out[1], dx, dscale, dbias
        dx, dscale, dbias = vjp(dout)
        return out, dx + dresidual, dscale, dbias

    return jax.jit(step).trace(*args).lower().compile(aot.GPU_COMPILE_OPTIONS).as_text()


def _full_size_f32(text: str, channels: int = 192) -> list[str]:
    """Instructions of the entry computation that write a float32 array of x's size."""
    entry = text.split("ENTRY", 1)[1]
    return [
        ln
        for ln in entry.splitlines()
        if f" = f32[64,784,{channels}]" in ln or f" = f32[50176,{channels}]" in ln
    ]


def test_gpu_program_takes_the_kernel_and_moves_fewer_bytes():
    """Forward, backward and the residual's add: XLA's ops move 13 arrays of x's size; with the
    kernel (x and dy read, dx written once) 8."""
    pytest.importorskip("jax_plugins.xla_cuda12", reason="the GPU compiler: the gpu extra")
    ours, xla = _gpu_program("auto"), _gpu_program("xla")
    assert "hiera_layer_norm_bwd" in ours and "hiera_layer_norm_bwd" not in xla
    assert _full_size_f32(xla) and not _full_size_f32(ours)  # XLA's x̂·dy in float32
    x_bytes = 64 * 784 * 192 * 2
    saved = hlo_cost.bytes_accessed(xla) - hlo_cost.bytes_accessed(ours)
    assert saved > 4 * x_bytes, saved / x_bytes
    # With the residual's gradient given to the norm: added in the kernel, two arrays fewer.
    paired = _gpu_program("auto", with_input=True)
    assert "hiera_layer_norm_bwd" in paired
    saved = hlo_cost.bytes_accessed(ours) - hlo_cost.bytes_accessed(paired)
    assert saved > 1.5 * x_bytes, saved / x_bytes
    xla_paired = _gpu_program("xla", with_input=True)
    assert hlo_cost.bytes_accessed(xla_paired) == hlo_cost.bytes_accessed(xla)


def test_gpu_program_without_a_tile_keeps_xlas_ops_with_the_statistics_written():
    """C = 200 has no power-of-two chunk for Triton: XLA's ops, with the statistics written
    first (the barrier), still without XLA's float32 x̂·dy."""
    pytest.importorskip("jax_plugins.xla_cuda12", reason="the GPU compiler: the gpu extra")
    ours, xla = _gpu_program("auto", 200), _gpu_program("xla", 200)
    assert "hiera_layer_norm_bwd" not in ours
    assert "optimization_barrier" in ours and "optimization_barrier" not in xla
    assert _full_size_f32(xla, 200) and not _full_size_f32(ours, 200)
    x_bytes = 64 * 784 * 200 * 2
    saved = hlo_cost.bytes_accessed(xla) - hlo_cost.bytes_accessed(ours)
    assert saved > 2 * x_bytes, saved / x_bytes
