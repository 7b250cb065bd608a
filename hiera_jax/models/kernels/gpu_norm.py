"""LayerNorm with a GPU backward that reads x and dy once and writes dx once.

XLA's backward of LayerNorm recomputes the per-token mean and 1/σ inside each fusion that needs
them, and a row reduction cannot feed the column reductions of the scale and bias gradients in
one fusion: on a GPU it wrote x̂·dy as a float32 [tokens, C] array to sum it and read x and dy
again for dx, so a norm's backward moved about 4x its forward (BENCHMARKS.md, "GPU traffic":
norms 14 / 55 MB per image of the Hiera-B finetune step). Here the forward is XLA's (one fusion,
x read once) and the backward is one Pallas Triton kernel per tile of rows: the statistics
recomputed from the tile (the forward's two-pass ones), dx written, and the scale and bias
gradients summed over the tile into per-tile partial sums that XLA adds up (C floats per 64
rows).

Where Triton cannot tile x (C with no power-of-two chunk of 16 or more, rows that no tile
divides), the backward is XLA's ops arranged to write the two float32 statistics per token first
(one pass over x, behind an optimization barrier), then one column reduction for both vector
gradients and one row pass for dx; its statistics come from a shifted one-pass variance, within
float32 rounding of the two-pass ones.

`kernel="auto"` takes this path in 16-bit programs compiled for an NVIDIA GPU, as the other GPU
kernels do; CPU and TPU programs and float32 programs keep XLA's ops; "xla" never. Measured only
as compiled here, without a GPU (bytes, not speed; tiles chosen by rule, not autotuned).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hiera_jax.models.kernels import gpu_mlp, tpu
from hiera_jax.models.kernels.fused_mlp import normalize as xla_norm

_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gpu_layer_norm(x, scale, bias, eps: float, dtype, backward: str = "auto") -> jnp.ndarray:
    """`xla_norm` (`fused_mlp.normalize`) with the backward of the module docstring:
    `backward` "auto" takes the kernel where it tiles x, else XLA's ops; "xla" XLA's ops;
    "interpret" the kernel in Pallas' interpreter (the tests, off a GPU)."""
    return xla_norm(x, scale, bias, eps, dtype)


def _forward(x, scale, bias, eps, dtype, backward):
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


def xla_backward(x, scale, g, eps: float):
    """The backward in XLA's ops: (dx, dscale, dbias)."""
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


def kernel_fits(x: jnp.ndarray) -> bool:
    """Whether `kernel_backward` tiles x [..., C]: C up to gpu_mlp.MAX_DIM in power-of-two
    chunks, and a row tile that divides each device's rows."""
    rows = tpu.batch_per_device(x.shape[0]) * math.prod(x.shape[1:-1])
    dim = x.shape[-1]
    return (
        dim <= gpu_mlp.MAX_DIM
        and gpu_mlp._dim_chunk(dim) is not None
        and gpu_mlp._row_tile(rows, dim) is not None
    )


def _kernel(x_ref, g_ref, s_ref, *refs, c, eps):
    """One tile of rows; with a residual gradient (`refs` then starts with its ref), dx is the
    sum of both paths' gradients."""
    dres_ref, (dx_ref, dscale_ref, dbias_ref) = (
        (refs[0], refs[1:]) if len(refs) == 4 else (None, refs)
    )
    chunks = x_ref.shape[1] // c
    _, xhat, rstd = gpu_mlp._norm(x_ref, chunks, c, eps)  # the forward's two-pass statistics
    dy = [g_ref[:, pl.ds(k * c, c)].astype(jnp.float32) for k in range(chunks)]
    residual = None
    if dres_ref is not None:
        residual = [dres_ref[:, pl.ds(k * c, c)].astype(jnp.float32) for k in range(chunks)]
    gpu_mlp.norm_backward(dy, xhat, rstd, s_ref, c, dx_ref, dscale_ref, dbias_ref, residual)


def _kernel_call(x2, g2, scale, eps: float, interpret: bool, dres2=None):
    rows, dim = x2.shape
    c, tile = gpu_mlp._dim_chunk(dim), gpu_mlp._row_tile(rows, dim)
    tiles = rows // tile
    row = pl.BlockSpec((tile, dim), lambda i: (i, 0))
    partial = pl.BlockSpec((None, dim), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_kernel, c=c, eps=eps),
        grid=(tiles,),
        in_specs=[row, row, pl.BlockSpec((dim,), lambda i: (0,))] + [row] * (dres2 is not None),
        out_specs=[row, partial, partial],
        out_shape=[
            jax.ShapeDtypeStruct(x2.shape, x2.dtype),
            jax.ShapeDtypeStruct((tiles, dim), jnp.float32),
            jax.ShapeDtypeStruct((tiles, dim), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        cost_estimate=pl.CostEstimate(
            flops=12 * rows * dim,
            transcendentals=rows,
            bytes_accessed=(6 + 2 * (dres2 is not None)) * rows * dim,
        ),
        interpret=interpret,
        name="hiera_layer_norm_bwd",
    )(x2, g2, scale, *([] if dres2 is None else [dres2]))


def kernel_backward(x, scale, g, eps: float, interpret: bool = False, dres=None):
    """The backward as one Pallas Triton kernel per tile of rows: x and dy (and `dres`, a
    gradient to add to dx) read once, dx written, the scale and bias gradients as per-tile
    partial sums (no statistics written); (dx, dscale, dbias). Off a GPU it runs in Pallas'
    interpreter (`interpret=True`)."""

    def run(x, g, *rest):
        *dres, scale = rest  # per_device passes the batched arrays, then the shared scale
        dim = x.shape[-1]
        rows = [a.reshape(-1, dim) for a in (x, g, *dres)]
        dx, dscale, dbias = _kernel_call(
            rows[0], rows[1], scale.astype(jnp.float32), eps, interpret, *rows[2:]
        )
        return (dx.reshape(x.shape),), (dscale.sum(0), dbias.sum(0))

    batched = (x, g.astype(x.dtype)) + (() if dres is None else (dres.astype(x.dtype),))
    (dx,), (dscale, dbias) = tpu.per_device(run, batched, (scale,))
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


def _backward(eps, dtype, backward, saved, g):
    del dtype
    x, scale = saved
    if backward != "xla" and kernel_fits(x):
        return kernel_backward(x, scale, g, eps, interpret=backward == "interpret")
    return xla_backward(x, scale, g, eps)


gpu_layer_norm.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gpu_layer_norm_and_input(x, scale, bias, eps: float, dtype, backward: str = "auto"):
    """(x, `gpu_layer_norm(x)`): for a pre-norm block, whose residual stream is the norm's
    input, so that the backward adds the stream's gradient to dx inside the kernel instead of in
    a pass of its own over three token-sized arrays."""
    return x, xla_norm(x, scale, bias, eps, dtype)


def _pair_forward(x, scale, bias, eps, dtype, backward):
    return gpu_layer_norm_and_input(x, scale, bias, eps, dtype, backward), (x, scale)


def _pair_backward(eps, dtype, backward, saved, cotangents):
    del dtype
    x, scale = saved
    dres, g = cotangents
    if backward != "xla" and kernel_fits(x):
        return kernel_backward(x, scale, g, eps, backward == "interpret", dres)
    dx, dscale, dbias = xla_backward(x, scale, g, eps)
    return dx + dres.astype(dx.dtype), dscale, dbias


gpu_layer_norm_and_input.defvjp(_pair_forward, _pair_backward)


def layer_norm(x, scale, bias, eps: float, dtype, kernel: str = "auto", with_input: bool = False):
    """LayerNorm over the last axis: `gpu_layer_norm` in 16-bit GPU programs, else XLA's ops.
    `with_input`: (x, norm(x)), for the residual stream of a pre-norm block (on a GPU
    `gpu_layer_norm_and_input`, elsewhere x itself)."""
    tpu.check_kernel(kernel, "norm kernel")

    def plain(x, scale, bias):
        out = xla_norm(x, scale, bias, eps, dtype)
        return (x, out) if with_input else out

    if kernel == "xla" or x.dtype not in _SIXTEEN_BIT:
        return plain(x, scale, bias)

    def gpu(x, scale, bias):
        norm = gpu_layer_norm_and_input if with_input else gpu_layer_norm
        return norm(x, scale, bias, eps, dtype)

    return lax.platform_dependent(x, scale, bias, cuda=gpu, default=plain)
