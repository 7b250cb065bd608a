"""A block's MLP half, x + drop(fc2(act(fc1(norm2(x))))), as one Pallas TPU kernel.

XLA writes fc1's output [B, N, 4·C] to HBM, reads it back for the activation and fc2, and its
backward reads and writes several more arrays of that size: with attention in its kernels, the
MLP was a third of a Hiera finetune step's HBM traffic (BENCHMARKS.md, "Where the bytes go"). One
MLP's two weight matrices fit in a TPU core's VMEM (Hiera-B's stage 4: 9.4 MB in bf16), so a grid
step reads a tile of the residual stream and writes the block's output tile, with the norm, the
hidden activation and the branch only in VMEM. The backward recomputes them from x rather than
saving them and sums the weight gradients in VMEM over its grid: HBM sees x, the output, their
gradients and the weights once. (An MLP kernel without the norm and residual moved more: XLA
had fused the norm into fc1 and the residual into fc2, and the kernel made it write them.)

`kernel` as for attention (`hiera_jax.models.kernels.tpu.KERNELS`): "auto" = the kernel in programs
compiled for a TPU, the Triton kernels of `hiera_jax.models.kernels.gpu_mlp` in 16-bit programs compiled
for an NVIDIA GPU, XLA's ops elsewhere (the float32 parity tests run there); "xla" never;
"pallas" everywhere, interpreted off TPU. MLPs whose weights and gradients do not fit VMEM, with
too few tokens per device to pay (the weights outweigh the activations), or with an activation
other than exact GELU take XLA's ops.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hiera_jax.models.activations import ACTIVATIONS
from hiera_jax.models.kernels import gpu_mlp, tpu
from hiera_jax.models.kernels.matmul import dense_dot_general

# Activations the kernel computes (Hiera's exact GELU); others take XLA's ops.
FUSED_ACTIVATIONS = ("gelu", "gelu_python")
ROWS = 512  # token rows per grid step: whole images when they are short, a tile of one if long


class MlpHalf(NamedTuple):
    """The parameters of a block's MLP half, in the compute dtype (the norm's in float32, as
    LayerNorm keeps them). w1 [C, H], b1 [H], w2 [H, C], b2 [C], norm_scale / norm_bias [C]."""

    norm_scale: jnp.ndarray
    norm_bias: jnp.ndarray
    w1: jnp.ndarray
    b1: jnp.ndarray
    w2: jnp.ndarray
    b2: jnp.ndarray


def _layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis in f32 (two-pass variance): (normalised, x̂, 1/σ); the
    kernels keep x̂ and 1/σ for the backward."""
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(axis=-1, keepdims=True)
    rstd = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    xhat = centred * rstd
    return xhat * scale + bias, xhat, rstd


def normalize(x, scale, bias, eps: float, dtype) -> jnp.ndarray:
    """LayerNorm over the last axis, statistics and affine in f32, the result in `dtype`."""
    return _layer_norm(x, scale, bias, eps)[0].astype(dtype)


def xla_mlp(x, w1, b1, w2, b2, act: str = "gelu") -> jnp.ndarray:
    """act(x w1 + b1) w2 + b2 as two `nn.Dense` layers compute it, in x's dtype."""
    h = dense_dot_general(x, w1, (((x.ndim - 1,), (0,)), ((), ()))) + b1
    h = ACTIVATIONS[act](h)
    return dense_dot_general(h, w2, (((h.ndim - 1,), (0,)), ((), ()))) + b2


def drop_path(x, keep: jnp.ndarray | None, keep_scale) -> jnp.ndarray:
    """Stochastic depth: examples with `keep` False zeroed, the others divided by `keep_scale`;
    `keep` None = no drop."""
    if keep is None:
        return x
    keep = keep.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(keep_scale, x.dtype), jnp.zeros_like(x))


def xla_mlp_half(x, p: MlpHalf, eps: float, keep, keep_scale, act: str = "gelu"):
    """x + drop_path(mlp(norm(x))) as XLA's ops: the block's arithmetic without the kernel."""
    y = xla_mlp(normalize(x, p.norm_scale, p.norm_bias, eps, p.w1.dtype), *p[2:], act)
    return x + drop_path(y, keep, keep_scale)


def mlp_half(
    x: jnp.ndarray,
    p: MlpHalf,
    eps: float,
    keep: jnp.ndarray | None = None,
    keep_scale: float | jnp.ndarray = 1.0,
    act: str = "gelu",
    kernel: str = "auto",
) -> jnp.ndarray:
    """x + drop_path(fc2(act(fc1(norm(x))))) on tokens [B, N, C]; `keep` [B] bool (None = no
    drop path) and `keep_scale` as `drop_path` takes them; `kernel` as the module docstring."""
    tpu.check_kernel(kernel, "mlp_kernel")
    if x.ndim != 3 or p.w1.shape[0] != x.shape[-1] or p.w2.shape != p.w1.shape[::-1]:
        raise ValueError(f"x {x.shape}, w1 {p.w1.shape}, w2 {p.w2.shape} are not an MLP half")
    reference = functools.partial(xla_mlp_half, eps=eps, act=act)
    fused = kernel != "xla" and act in FUSED_ACTIVATIONS
    on_tpu = fused and kernel_fits(x, p.w1)
    on_gpu = fused and kernel == "auto" and gpu_mlp.kernel_fits(x, p.w1)
    if not (on_tpu or on_gpu):
        return reference(x, p, keep=keep, keep_scale=keep_scale)
    # The drop path as a per-example factor: 0, or 1 / keep_scale.
    if keep is None:
        factor = jnp.ones((x.shape[0], 1, 1), jnp.float32)
    else:
        inverse = 1.0 / jnp.asarray(keep_scale, jnp.float32)
        factor = jnp.where(keep, inverse, 0.0).astype(jnp.float32).reshape(-1, 1, 1)

    def fallback(x, factor, *p_):
        return reference(x, MlpHalf(*p_), keep=keep, keep_scale=keep_scale)

    def pallas(x, factor, *p_, interpret: bool):
        return _fused(x, factor, MlpHalf(*p_), eps, interpret)

    def triton(x, factor, *p_):
        return gpu_mlp.mlp_half(x, factor, MlpHalf(*p_), eps)

    branches = {"cuda": triton} if on_gpu else {}
    if on_tpu:
        branches["tpu"] = functools.partial(pallas, interpret=False)
    other = functools.partial(pallas, interpret=True) if on_tpu and kernel == "pallas" else fallback
    return lax.platform_dependent(x, factor, *p, **branches, default=other)


def _tiles(batch: int, tokens: int, item: int) -> tuple[int, int]:
    """(images, token rows) per grid step: a row tile divides the tokens in whole sublane
    groups (a partial tile would be a relayout), and short images are taken several at once."""
    rows = tokens
    if tokens > ROWS:
        group = 32 // item  # rows per packed sublane tile: 8 in f32, 16 in bf16
        fitting = [r for r in range(group, ROWS + 1, group) if tokens % r == 0]
        rows = fitting[-1] if fitting else tokens
    images = max(d for d in range(1, batch + 1) if batch % d == 0 and d * rows <= max(ROWS, rows))
    return images, rows


def _vmem_bytes(batch: int, x, w1) -> int:
    """The backward's VMEM (the larger pass) on `batch` images: double-buffered token tiles and
    weights, the f32 weight gradients, and f32 temporaries of a tile's hidden activation."""
    (tokens, dim), hidden = x.shape[1:], w1.shape[1]
    item = jnp.dtype(x.dtype).itemsize
    images, rows = _tiles(batch, tokens, item)
    padded = -(-rows // 8) * 8
    tiles = 2 * 3 * images * padded * tpu.lanes(dim) * item  # x, dout, dx
    matrices = dim * tpu.lanes(hidden) + hidden * tpu.lanes(dim)
    weights = 2 * matrices * item
    grads = 2 * matrices * 4
    temporaries = padded * (6 * tpu.lanes(hidden) + 6 * tpu.lanes(dim)) * 4
    return tiles + weights + grads + temporaries


def kernel_fits(x, w1) -> bool:
    """Whether the kernel's VMEM fits 4/5 of its limit on the chip compiled for, and whether it
    pays: below C token rows per device the weights and their f32 gradients, which the kernel
    reads and writes once per device, outweigh the activations it keeps out of HBM
    (`python benchmarks/mlp_kernel.py`: Hiera-B's stage 4, C = 768, at 16 images per chip (784
    rows) moved 5.0 MB per image through the kernel against XLA's 5.6, at 8 images 9.1 against
    7.4)."""
    batch = tpu.batch_per_device(x.shape[0])
    vmem = _vmem_bytes(batch, x, w1)
    return batch * x.shape[1] >= x.shape[2] and vmem <= 0.8 * tpu.vmem_limit()


def _gelu(x: jnp.ndarray) -> jnp.ndarray:
    return ACTIVATIONS["gelu"](x)


def _forward_kernel(x_ref, f_ref, g_ref, be_ref, w1_ref, b1_ref, w2_ref, b2_ref, o_ref, *, eps):
    w1, w2 = w1_ref[...], w2_ref[...]
    for i in range(x_ref.shape[0]):  # the step's images
        x = x_ref[i]
        xn = normalize(x, g_ref[...], be_ref[...], eps, w1.dtype)
        h = _gelu(tpu.dot(xn, w1, ((1,), (0,))) + b1_ref[...].astype(jnp.float32))
        y = tpu.dot(h.astype(w2.dtype), w2, ((1,), (0,))) + b2_ref[...].astype(jnp.float32)
        o_ref[i] = (x.astype(jnp.float32) + f_ref[i] * y).astype(o_ref.dtype)


def _backward_kernel(
    x_ref, do_ref, f_ref, g_ref, be_ref, w1_ref, b1_ref, w2_ref,  # inputs
    dx_ref, dg_ref, dbe_ref, dw1_ref, db1_ref, dw2_ref, db2_ref,  # gradients
    *, eps,
) -> None:  # fmt: skip
    grads = (dg_ref, dbe_ref, dw1_ref, db1_ref, dw2_ref, db2_ref)

    # The parameters' gradients stay in VMEM over this core's steps (their block never changes).
    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        for ref in grads:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    w1, w2 = w1_ref[...], w2_ref[...]
    dtype = w1.dtype
    for i in range(x_ref.shape[0]):
        x, dout = x_ref[i], do_ref[i].astype(jnp.float32)
        xn32, xhat, rstd = _layer_norm(x, g_ref[...], be_ref[...], eps)  # the forward, again
        xn = xn32.astype(dtype)
        h, gelu_vjp = jax.vjp(
            _gelu, tpu.dot(xn, w1, ((1,), (0,))) + b1_ref[...].astype(jnp.float32)
        )
        dy32 = dout * f_ref[i]  # through the drop path
        dy = dy32.astype(dtype)
        (dpre32,) = gelu_vjp(tpu.dot(dy, w2, ((1,), (1,))))  # dy w2ᵀ through the activation
        dpre = dpre32.astype(dtype)
        dxn = tpu.dot(dpre, w1, ((1,), (1,)))  # dpre w1ᵀ: [rows, C]
        # LayerNorm's backward: d x̂ = dxn·γ, dx = (d x̂ - mean(d x̂) - x̂·mean(d x̂·x̂)) / σ.
        dxhat = dxn * g_ref[...]
        mean_d = dxhat.mean(axis=-1, keepdims=True)
        mean_dx = (dxhat * xhat).mean(axis=-1, keepdims=True)
        dx = dout + (dxhat - mean_d - xhat * mean_dx) * rstd
        dx_ref[i] = dx.astype(dx_ref.dtype)
        dg_ref[0] += (dxn * xhat).sum(axis=0, keepdims=True)
        dbe_ref[0] += dxn.sum(axis=0, keepdims=True)
        dw1_ref[0] += tpu.dot(xn, dpre, ((0,), (0,)))  # xnᵀ dpre
        db1_ref[0] += dpre32.sum(axis=0, keepdims=True)
        dw2_ref[0] += tpu.dot(h.astype(dtype), dy, ((0,), (0,)))  # hᵀ dy
        db2_ref[0] += dy32.sum(axis=0, keepdims=True)


def _cost(x, w1, matmuls: int, tensors: int) -> pl.CostEstimate:
    """`matmuls` [B·N, C] x [C, H] products (forward 2; backward 5, fc1 recomputed) and
    `tensors` [B, N, C] arrays read or written, so that XLA's cost analysis sees the kernel."""
    (batch, tokens, dim), hidden = x.shape, w1.shape[1]
    item = jnp.dtype(x.dtype).itemsize
    weights = 2 * dim * hidden * (item if matmuls == 2 else item + 4)  # + f32 gradients
    return pl.CostEstimate(
        flops=2 * batch * tokens * hidden * dim * matmuls,
        transcendentals=batch * tokens * hidden,
        bytes_accessed=batch * tokens * dim * item * tensors + weights,
    )


def _specs(x, cores: int = 0):
    """BlockSpecs on the grid (images, row tiles), or with `cores` (cores, images, row tiles):
    a token tile, a whole parameter, a per-image factor, a per-core partial sum."""
    images, rows = _tiles(x.shape[0], x.shape[1], jnp.dtype(x.dtype).itemsize)
    dim = x.shape[2]
    if not cores:
        grid = (x.shape[0] // images, x.shape[1] // rows)
        tile = pl.BlockSpec((images, rows, dim), lambda i, j: (i, j, 0))
        factor = pl.BlockSpec((images, 1, 1), lambda i, j: (i, 0, 0))
        return grid, tile, factor, lambda a: pl.BlockSpec(a.shape, lambda i, j: (0, 0)), None
    per_core = x.shape[0] // images // cores
    grid = (cores, per_core, x.shape[1] // rows)
    tile = pl.BlockSpec((images, rows, dim), lambda c, i, j: (c * per_core + i, j, 0))
    factor = pl.BlockSpec((images, 1, 1), lambda c, i, j: (c * per_core + i, 0, 0))

    def whole(a):
        return pl.BlockSpec(a.shape, lambda c, i, j: (0, 0))

    def partial_sum(shape):
        return pl.BlockSpec((1, *shape), lambda c, i, j: (c, 0, 0))

    return grid, tile, factor, whole, partial_sum


def _rows(p: MlpHalf) -> tuple[jnp.ndarray, ...]:
    """The parameters as 2-D arrays (vectors as [1, n] rows), as the kernels take them."""
    return tuple(a.reshape(1, -1) if a.ndim == 1 else a for a in p)


def _forward_call(x, factor, p: MlpHalf, eps: float, interpret: bool) -> jnp.ndarray:
    grid, tile, per_image, whole, _ = _specs(x)
    params = _rows(p)
    return pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps),
        grid=grid,
        in_specs=[tile, per_image, *(whole(a) for a in params)],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=tpu.vmem_limit()
        ),
        cost_estimate=_cost(x, p.w1, 2, 2),
        interpret=interpret,
    )(x, factor, *params)


def _backward_call(x, dout, factor, p: MlpHalf, eps: float, interpret: bool):
    """(dx, parameter gradients in f32): the kernel keeps one partial sum per TensorCore."""
    images, _ = _tiles(x.shape[0], x.shape[1], jnp.dtype(x.dtype).itemsize)
    cores = tpu.tensor_cores()
    cores = cores if (x.shape[0] // images) % cores == 0 else 1
    grid, tile, per_image, whole, partial_sum = _specs(x, cores)
    params = _rows(p)
    no_bias = params[:-1]  # b2 only enters the forward
    grad_shapes = [a.shape for a in params]
    dx, *grads = pl.pallas_call(
        functools.partial(_backward_kernel, eps=eps),
        grid=grid,
        in_specs=[tile, tile, per_image, *(whole(a) for a in no_bias)],
        out_specs=[tile, *(partial_sum(shape) for shape in grad_shapes)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)]
        + [jax.ShapeDtypeStruct((cores, *shape), jnp.float32) for shape in grad_shapes],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=tpu.vmem_limit(),
        ),
        cost_estimate=_cost(x, p.w1, 5, 3),
        interpret=interpret,
    )(x, dout, factor, *no_bias)
    return dx, tuple(g.sum(axis=0).reshape(a.shape) for g, a in zip(grads, p))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x, factor, p: MlpHalf, eps: float, interpret: bool) -> jnp.ndarray:
    def run(x, factor, *p_):
        return (_forward_call(x, factor, MlpHalf(*p_), eps, interpret),), ()

    return tpu.per_device(run, (x, factor), tuple(p))[0][0]


def _fused_fwd(x, factor, p, eps, interpret):
    return _fused(x, factor, p, eps, interpret), (x, factor, p)


def _fused_bwd(eps, interpret, residuals, dout):
    x, factor, p = residuals

    def run(x, dout, factor, *p_):
        dx, grads = _backward_call(x, dout, factor, MlpHalf(*p_), eps, interpret)
        return (dx,), grads

    (dx,), grads = tpu.per_device(run, (x, dout.astype(x.dtype), factor), tuple(p))
    grads = MlpHalf(*(g.astype(a.dtype) for g, a in zip(grads, p)))
    return dx, jnp.zeros_like(factor), grads


_fused.defvjp(_fused_fwd, _fused_bwd)
