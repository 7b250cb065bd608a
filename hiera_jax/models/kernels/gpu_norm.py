"""LayerNorm with a GPU backward that writes no float32 copy of the tokens.

XLA's backward of LayerNorm recomputes the per-token mean and 1/σ inside each fusion that needs
them, and a row reduction cannot feed the column reductions of the scale and bias gradients in
one fusion: on a GPU it wrote x̂·dy as a float32 [tokens, C] array to sum it and read dy once more
for the bias, so a norm's backward moved about 4x its forward (BENCHMARKS.md, "GPU traffic":
norms 14 / 55 MB per image of the Hiera-B finetune step). Here the forward is XLA's (one fusion,
x read once) and the backward first writes the two float32 statistics per token (one pass over
x; C times smaller than x), then sums the scale and bias gradients in one column reduction and
computes dx in one row pass. The forward's arithmetic is unchanged; the backward's statistics
come from a shifted one-pass variance, within float32 rounding of the two-pass ones.

`kernel="auto"` takes this path in 16-bit programs compiled for an NVIDIA GPU, as the other GPU
kernels do; CPU and TPU programs and float32 programs keep XLA's ops; "xla" never.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from hiera_jax.models.kernels import tpu
from hiera_jax.models.kernels.fused_mlp import normalize as xla_norm

_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gpu_layer_norm(x, scale, bias, eps: float, dtype) -> jnp.ndarray:
    """`xla_norm` (`fused_mlp.normalize`) with the backward of the module docstring."""
    return xla_norm(x, scale, bias, eps, dtype)


def _forward(x, scale, bias, eps, dtype):
    return xla_norm(x, scale, bias, eps, dtype), (x, scale)


def _centred_stats(x32: jnp.ndarray, eps: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(mean of x minus its first element, 1/σ) in one pass over x.

    Shifted by the row's first element, so that a large mean does not cancel the variance away,
    the mean and mean square are sibling reductions that XLA computes in one read (the forward's
    two-pass statistics would take two). The shift stays implicit: every consumer reads x, and
    its first element with it, anyway.
    """
    d = x32 - x32[..., :1]
    m1 = jnp.mean(d, axis=-1, keepdims=True)
    m2 = jnp.mean(d * d, axis=-1, keepdims=True)
    rstd = lax.rsqrt(jnp.maximum(m2 - m1 * m1, 0.0) + eps)
    # The barrier makes XLA write the statistics (two floats per token): left visible, it
    # recomputes them inside each consumer, where a row reduction cannot feed the column
    # reductions of the scale and bias gradients, and it writes x̂·dy at full size instead.
    return lax.optimization_barrier((m1, rstd))


def _backward(eps, dtype, saved, g):
    del dtype
    x, scale = saved
    x32 = x.astype(jnp.float32)
    m1, rstd = _centred_stats(x32, eps)
    g32 = g.astype(jnp.float32)
    xhat = (x32 - x32[..., :1] - m1) * rstd
    leading = tuple(range(x.ndim - 1))
    dscale = jnp.sum(g32 * xhat, axis=leading)
    dbias = jnp.sum(g32, axis=leading)
    gs = g32 * scale
    dx = rstd * (
        gs
        - jnp.mean(gs, axis=-1, keepdims=True)
        - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)
    )
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


gpu_layer_norm.defvjp(_forward, _backward)


def layer_norm(x, scale, bias, eps: float, dtype, kernel: str = "auto") -> jnp.ndarray:
    """LayerNorm over the last axis: `gpu_layer_norm` in 16-bit GPU programs, else XLA's ops."""
    tpu.check_kernel(kernel, "norm kernel")
    plain = functools.partial(xla_norm, eps=eps, dtype=dtype)
    if kernel == "xla" or x.dtype not in _SIXTEEN_BIT:
        return plain(x, scale, bias)

    def gpu(x, scale, bias):
        return gpu_layer_norm(x, scale, bias, eps, dtype)

    return lax.platform_dependent(x, scale, bias, cuda=gpu, default=plain)
