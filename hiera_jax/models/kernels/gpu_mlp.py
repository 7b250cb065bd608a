"""A block's MLP half, x + drop(fc2(gelu(fc1(norm2(x))))), as Pallas GPU (Triton) kernels.

On a GPU XLA runs the MLP as two cuBLAS GEMMs with the norm, the exact GELU (not a cuBLAS
epilogue: only the tanh form is) and the residual as separate fusions: fc1's output [rows, 4·C]
is written, read and written again by the GELU and read by fc2, and the backward moves several
more arrays of that size. It was 37% of a Hiera-B finetune step's GPU traffic (BENCHMARKS.md,
"GPU traffic"). Here:
- the forward is one kernel per tile of rows: the norm, fc1, the GELU, fc2, the drop path and
  the residual, with the hidden activation in registers, chunk by chunk: HBM sees x, the output
  and the weights;
- the backward is two kernels that both recompute the norm, fc1 and the GELU from x and dout,
  so that no [rows, 4·C] array is written and read back (the cuBLAS weight gradients that this
  replaced needed the activation and its gradient in HBM: 118 of the base finetune step's 503
  MB per image went to the MLP's backward, 32 now). One kernel per tile of rows writes dx,
  and the vector gradients as per-tile partial sums; the other, one program per (split of the
  rows, group of hidden columns), sums both weight gradients of its columns over its rows in
  f32 registers and writes them as per-split partial sums. The price is FLOPs: fc1 is computed
  three times (the forward and each backward kernel) and dy w2ᵀ twice, 9 GEMMs of the MLP's
  size where XLA's ops run 6, which a step bound by HBM traffic (BENCHMARKS.md) can afford.

Triton's blocks are powers of two: C is taken in chunks of the largest power of two up to 128
that divides it (Hiera-B: 32, 64, 128, 128), the hidden axis in chunks of 64. The exact GELU's
erf is XLA's own float32 rational approximation (Triton has no erf; `erf` below, within 4e-7 of
the exact function). Off a GPU the kernels run in Pallas' interpreter (`interpret=True`, the
tests' float32 check against XLA's path).

Measured only as compiled here, without a GPU: the bytes of the program (BENCHMARKS.md), not its
speed, and Triton's tiles are not autotuned. `mlp_kernel="xla"` keeps XLA's path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hiera_jax.models.kernels import tpu

HIDDEN_CHUNK = 64  # columns of fc1's output a loop step computes
GPU_SMS = 132  # an H100 SXM's: the weight-gradient kernel's programs fill them
# The widest C compiled (Hiera-L's last stage): at Hiera-H's 2048, Triton asked for 272 KB of
# shared memory, more than a Hopper SM has (H100 and H200 targets, compiled here).
MAX_DIM = 1152
MAX_DIM_CHUNK = 128
# XLA's float32 erf (its `ErfImpl32`, Eigen's `generic_fast_erf_float`): x·P(x²)/Q(x²) on [-4, 4].
_ERF_ALPHA = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_BETA = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def erf(x: jnp.ndarray) -> jnp.ndarray:
    """erf in float32 from multiplies and one divide (Triton has no erf instruction)."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = jnp.full_like(x, _ERF_ALPHA[0])
    for c in _ERF_ALPHA[1:]:
        p = p * x2 + c
    q = jnp.full_like(x, _ERF_BETA[0])
    for c in _ERF_BETA[1:]:
        q = q * x2 + c
    return x * p / q


def _gelu_and_slope(h: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Exact GELU h·Φ(h) and its derivative Φ(h) + h·φ(h), float32."""
    cdf = 0.5 * (1.0 + erf(h * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return h * cdf, cdf + h * pdf


def _dim_chunk(dim: int) -> int | None:
    chunk = MAX_DIM_CHUNK
    while chunk >= 16 and dim % chunk:
        chunk //= 2
    return chunk if chunk >= 16 else None


def _row_tile(rows: int, dim: int) -> int | None:
    """Rows per program: 64, or 32 for wide MLPs (the f32 accumulators live in registers)."""
    for tile in (64, 32, 16) if dim <= 384 else (32, 16):
        if rows % tile == 0:
            return tile
    return None


def kernel_fits(x: jnp.ndarray, w1: jnp.ndarray) -> bool:
    """Whether the kernels take this MLP: C up to MAX_DIM, chunks of C and of the hidden axis,
    and a row tile, that are powers of two dividing them; 16-bit compute (float32 keeps XLA's
    path)."""
    rows = tpu.batch_per_device(x.shape[0]) * math.prod(x.shape[1:-1])  # per device
    dim, hidden = x.shape[-1], w1.shape[1]
    return (
        jnp.dtype(w1.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and dim <= MAX_DIM
        and _dim_chunk(dim) is not None
        and hidden % HIDDEN_CHUNK == 0
        and _row_tile(rows, dim) is not None
    )


def _dot(a, b, contract=((1,), (0,))):
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _norm(x_ref, chunks: int, c: int, eps: float, rows=slice(None)):
    """LayerNorm of the tile's rows in f32, chunk by chunk: (x chunks, x̂ chunks, 1/σ)."""
    xs = [x_ref[rows, pl.ds(k * c, c)].astype(jnp.float32) for k in range(chunks)]
    dim = chunks * c
    mean = sum(v.sum(axis=1, keepdims=True) for v in xs) / dim
    centred = [v - mean for v in xs]
    var = sum((v * v).sum(axis=1, keepdims=True) for v in centred) / dim
    rstd = lax.rsqrt(var + eps)
    xhat = [v * rstd for v in centred]
    return xs, xhat, rstd


def _affine(xhat, g_ref, be_ref, c: int, dtype):
    return [
        (v * g_ref[pl.ds(k * c, c)][None, :] + be_ref[pl.ds(k * c, c)][None, :]).astype(dtype)
        for k, v in enumerate(xhat)
    ]


def _forward_kernel(
    x_ref, f_ref, g_ref, be_ref, w1_ref, b1_ref, w2_ref, b2_ref, o_ref, *, c, eps
):  # fmt: skip
    chunks = x_ref.shape[1] // c
    dtype = w1_ref.dtype
    xs, xhat, _ = _norm(x_ref, chunks, c, eps)
    xn = _affine(xhat, g_ref, be_ref, c, dtype)

    def step(j, acc):
        cols = pl.ds(pl.multiple_of(j * HIDDEN_CHUNK, HIDDEN_CHUNK), HIDDEN_CHUNK)
        pre = b1_ref[cols][None, :].astype(jnp.float32)
        for k in range(chunks):
            pre = pre + _dot(xn[k], w1_ref[pl.ds(k * c, c), cols])
        act = _gelu_and_slope(pre)[0].astype(dtype)
        return tuple(a + _dot(act, w2_ref[cols, pl.ds(k * c, c)]) for k, a in enumerate(acc))

    zeros = tuple(jnp.zeros((x_ref.shape[0], c), jnp.float32) for _ in range(chunks))
    acc = lax.fori_loop(0, w1_ref.shape[1] // HIDDEN_CHUNK, step, zeros)
    factor = f_ref[...][:, None]
    for k in range(chunks):
        y = acc[k] + b2_ref[pl.ds(k * c, c)][None, :].astype(jnp.float32)
        o_ref[:, pl.ds(k * c, c)] = (xs[k] + factor * y).astype(o_ref.dtype)


def _backward_kernel(
    x_ref, do_ref, f_ref, g_ref, be_ref, w1_ref, b1_ref, w2_ref,  # inputs
    dx_ref, dg_ref, dbe_ref, db1_ref, db2_ref,  # dx, and this tile's partial sums
    *, c, eps,
):  # fmt: skip
    chunks = x_ref.shape[1] // c
    dtype = w1_ref.dtype
    _, xhat, rstd = _norm(x_ref, chunks, c, eps)
    xn = _affine(xhat, g_ref, be_ref, c, dtype)
    factor = f_ref[...][:, None]
    douts = [do_ref[:, pl.ds(k * c, c)].astype(jnp.float32) for k in range(chunks)]
    dy32 = [d * factor for d in douts]  # through the drop path
    dy = [d.astype(dtype) for d in dy32]
    for k in range(chunks):
        db2_ref[pl.ds(k * c, c)] = dy32[k].sum(axis=0)

    def step(j, dxn):
        cols = pl.ds(pl.multiple_of(j * HIDDEN_CHUNK, HIDDEN_CHUNK), HIDDEN_CHUNK)
        _, dpre32 = _hidden(xn, dy, w1_ref, b1_ref, w2_ref, cols, c)
        dpre = dpre32.astype(dtype)
        db1_ref[cols] = dpre32.sum(axis=0)
        return tuple(
            d + _dot(dpre, w1_ref[pl.ds(k * c, c), cols], ((1,), (1,)))  # dpre w1ᵀ
            for k, d in enumerate(dxn)
        )

    zeros = tuple(jnp.zeros((x_ref.shape[0], c), jnp.float32) for _ in range(chunks))
    dxn = lax.fori_loop(0, w1_ref.shape[1] // HIDDEN_CHUNK, step, zeros)
    norm_backward(dxn, xhat, rstd, g_ref, c, dx_ref, dg_ref, dbe_ref, douts)


def norm_backward(dy, xhat, rstd, g_ref, c: int, dx_ref, dg_ref, dbe_ref, residual=None):
    """LayerNorm's backward for one tile, from its output's gradient `dy` (f32 chunks): d x̂ =
    dy·γ, dx = (d x̂ - mean(d x̂) - x̂·mean(d x̂·x̂)) / σ, plus `residual` (f32 chunks) where a
    residual path's gradient joins it; the scale and bias gradients as this tile's sums."""
    dxhat = [d * g_ref[pl.ds(k * c, c)][None, :] for k, d in enumerate(dy)]
    dim = len(dy) * c
    mean_d = sum(d.sum(axis=1, keepdims=True) for d in dxhat) / dim
    mean_dx = sum((d * h).sum(axis=1, keepdims=True) for d, h in zip(dxhat, xhat)) / dim
    for k in range(len(dy)):
        dx = (dxhat[k] - mean_d - xhat[k] * mean_dx) * rstd
        if residual is not None:
            dx = residual[k] + dx
        dx_ref[:, pl.ds(k * c, c)] = dx.astype(dx_ref.dtype)
        dg_ref[pl.ds(k * c, c)] = (dy[k] * xhat[k]).sum(axis=0)
        dbe_ref[pl.ds(k * c, c)] = dy[k].sum(axis=0)


def _hidden(xn, dy, w1_ref, b1_ref, w2_ref, cols, c: int):
    """fc1's output columns `cols` through the GELU, and their gradient before it, f32:
    (gelu(xn w1 + b1), (dy w2ᵀ)·gelu'(...))."""
    pre = b1_ref[cols][None, :].astype(jnp.float32)
    dact = jnp.zeros((xn[0].shape[0], pre.shape[1]), jnp.float32)
    for k in range(len(xn)):
        pre = pre + _dot(xn[k], w1_ref[pl.ds(k * c, c), cols])
        dact = dact + _dot(dy[k], w2_ref[cols, pl.ds(k * c, c)], ((1,), (1,)))  # dy w2ᵀ
    act, slope = _gelu_and_slope(pre)
    return act, dact * slope


def _weight_kernel(
    x_ref, do_ref, f_ref, g_ref, be_ref, w1_ref, b1_ref, w2_ref,  # inputs
    dw1_ref, dw2_ref,  # this split's sums for this program's hidden columns
    *, c, eps, tile,
):  # fmt: skip
    """dw1 = xnᵀ dpre and dw2 = actᵀ dy over the split's rows, tile by tile, for the hidden
    columns of w1_ref / w2_ref: the activations are recomputed from x and dout, never read."""
    chunks = x_ref.shape[1] // c
    dtype = w1_ref.dtype
    cols = pl.ds(0, w1_ref.shape[1])

    def step(r, acc):
        rows = pl.ds(pl.multiple_of(r * tile, tile), tile)
        _, xhat, _ = _norm(x_ref, chunks, c, eps, rows)
        xn = _affine(xhat, g_ref, be_ref, c, dtype)
        factor = f_ref[rows][:, None]
        dy = [
            (do_ref[rows, pl.ds(k * c, c)].astype(jnp.float32) * factor).astype(dtype)
            for k in range(chunks)
        ]
        act, dpre = _hidden(xn, dy, w1_ref, b1_ref, w2_ref, cols, c)
        act, dpre = act.astype(dtype), dpre.astype(dtype)
        dw1 = tuple(a + _dot(xn[k], dpre, ((0,), (0,))) for k, a in enumerate(acc[0]))
        dw2 = tuple(a + _dot(act, dy[k], ((0,), (0,))) for k, a in enumerate(acc[1]))
        return dw1, dw2

    hc = w1_ref.shape[1]
    zeros = (
        tuple(jnp.zeros((c, hc), jnp.float32) for _ in range(chunks)),
        tuple(jnp.zeros((hc, c), jnp.float32) for _ in range(chunks)),
    )
    dw1, dw2 = lax.fori_loop(0, x_ref.shape[0] // tile, step, zeros)
    for k in range(chunks):
        dw1_ref[pl.ds(k * c, c), :] = dw1[k]
        dw2_ref[:, pl.ds(k * c, c)] = dw2[k]


def _cost(rows: int, dim: int, hidden: int, matmuls: int, arrays: float) -> pl.CostEstimate:
    """`matmuls` [rows, C] x [C, H] products (forward 2; backward: the row kernel 3 (fc1
    again, dy w2ᵀ, dpre w1ᵀ), the weight kernel 4 (fc1 and dy w2ᵀ again, both weight
    gradients)) and roughly `arrays` bf16 [rows, C] arrays moved, for XLA's and our FLOP
    counts."""
    return pl.CostEstimate(
        flops=2 * rows * dim * hidden * matmuls,
        transcendentals=rows * hidden,
        bytes_accessed=int(2 * rows * dim * arrays) + 4 * dim * hidden,
    )


def _params(c: int, tile: int, dim: int):
    return plgpu.CompilerParams(num_warps=8 if tile * dim > 64 * 256 else 4, num_stages=1)


def _forward_call(x2, factor, p, eps: float, interpret: bool):
    rows, dim = x2.shape
    c, tile = _dim_chunk(dim), _row_tile(rows, dim)
    row = pl.BlockSpec((tile, dim), lambda i: (i, 0))

    def whole(a):
        return pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)

    return pl.pallas_call(
        functools.partial(_forward_kernel, c=c, eps=eps),
        grid=(rows // tile,),
        in_specs=[row, pl.BlockSpec((tile,), lambda i: (i,)), *(whole(a) for a in p)],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        compiler_params=_params(c, tile, dim),
        cost_estimate=_cost(rows, dim, p[2].shape[1], 2, 2),
        interpret=interpret,
        name="hiera_mlp_half_fwd",
    )(x2, factor, *p)


def _weight_columns(dim: int) -> int:
    """Hidden columns per weight-gradient program: its two f32 accumulators, [C, n] and [n, C],
    stay near 12K values (registers), so fewer columns for wider MLPs (16 at least: Triton's
    smallest matmul side; C above 384 holds more)."""
    n = HIDDEN_CHUNK
    while n > 16 and n * dim > 6144:
        n //= 2  # a power of two, so it divides the hidden width (a multiple of 64)
    return n


def _row_splits(tiles: int, programs_per_split: int) -> int:
    """Splits of the rows for the weight-gradient kernel: enough programs to fill an H100's 132
    SMs, the fewest splits that do (each split writes its own f32 partial sums of the
    weights); a divisor of the number of row tiles."""
    target = max(1, -(-GPU_SMS // programs_per_split))
    return max(s for s in range(1, min(tiles, target) + 1) if tiles % s == 0)


def _backward_call(x2, dout, factor, p, eps: float, interpret: bool):
    """Two kernels: a row kernel (dx and the vector gradients) and a weight-gradient kernel
    over (row split, hidden columns). Both recompute fc1 and the GELU from x, so no activation
    4·C wide is written to HBM and read back: x and dout are each read twice, and the weight
    kernel writes f32 partial sums per row split."""
    rows, dim = x2.shape
    hidden = p[2].shape[1]
    c, tile = _dim_chunk(dim), _row_tile(rows, dim)
    tiles = rows // tile

    def row(width):
        return pl.BlockSpec((tile, width), lambda i: (i, 0))

    def whole(a):
        return pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)

    def partial_sum(width):
        return pl.BlockSpec((None, width), lambda i: (i, 0))

    no_bias = tuple(p)[:-1]  # b2 only enters the forward
    dx, dg, dbe, db1, db2 = pl.pallas_call(
        functools.partial(_backward_kernel, c=c, eps=eps),
        grid=(tiles,),
        in_specs=[row(dim), row(dim), pl.BlockSpec((tile,), lambda i: (i,))]
        + [whole(a) for a in no_bias],
        out_specs=[row(dim)] + [partial_sum(w) for w in (dim, dim, hidden, dim)],
        out_shape=[jax.ShapeDtypeStruct((rows, dim), x2.dtype)]
        + [jax.ShapeDtypeStruct((tiles, w), jnp.float32) for w in (dim, dim, hidden, dim)],
        compiler_params=_params(c, tile, dim),
        cost_estimate=_cost(rows, dim, hidden, 3, 3),
        interpret=interpret,
        name="hiera_mlp_half_bwd",
    )(x2, dout, factor, *no_bias)

    n = _weight_columns(dim)
    splits = _row_splits(tiles, hidden // n)
    split = rows // splits
    w1, b1, w2 = no_bias[2:]
    dw1, dw2 = pl.pallas_call(
        functools.partial(_weight_kernel, c=c, eps=eps, tile=tile),
        grid=(splits, hidden // n),
        in_specs=[
            pl.BlockSpec((split, dim), lambda s, j: (s, 0)),
            pl.BlockSpec((split, dim), lambda s, j: (s, 0)),
            pl.BlockSpec((split,), lambda s, j: (s,)),
            pl.BlockSpec((dim,), lambda s, j: (0,)),
            pl.BlockSpec((dim,), lambda s, j: (0,)),
            pl.BlockSpec((dim, n), lambda s, j: (0, j)),
            pl.BlockSpec((n,), lambda s, j: (j,)),
            pl.BlockSpec((n, dim), lambda s, j: (j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, dim, n), lambda s, j: (s, 0, j)),
            pl.BlockSpec((None, n, dim), lambda s, j: (s, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, dim, hidden), jnp.float32),
            jax.ShapeDtypeStruct((splits, hidden, dim), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
        cost_estimate=_cost(rows, dim, hidden, 4, 2 + 8 * splits * hidden / rows),
        interpret=interpret,
        name="hiera_mlp_half_wgrad",
    )(x2, dout, factor, *no_bias)
    grads = (dg.sum(0), dbe.sum(0), dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0))
    return dx, tuple(g.astype(a.dtype) for g, a in zip(grads, p))


def _per_row(x: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
    """The per-example factor [B, 1, 1] as one value per row of x [B, N, C] flattened."""
    return jnp.broadcast_to(factor.reshape(-1, 1), x.shape[:2]).reshape(-1).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def mlp_half(x, factor, p, eps: float, interpret: bool = False) -> jnp.ndarray:
    """x + factor·mlp(norm(x)) on x [B, N, C], factor [B, 1, 1] f32 (0 or 1/keep: the drop
    path); `p` = (norm scale, norm bias, w1, b1, w2, b2) as `fused_mlp.MlpHalf` holds them, in
    the compute dtype (the norm's in f32)."""

    def run(x, factor, *p_):
        rows = x.reshape(-1, x.shape[-1])
        out = _forward_call(rows, _per_row(x, factor), p_, eps, interpret)
        return (out.reshape(x.shape),), ()

    # Under a mesh, on each device's share of the batch (XLA cannot partition a kernel).
    return tpu.per_device(run, (x, factor), tuple(p))[0][0]


def _mlp_half_fwd(x, factor, p, eps, interpret):
    return mlp_half(x, factor, p, eps, interpret), (x, factor, p)


def _mlp_half_bwd(eps, interpret, residuals, dout):
    x, factor, p = residuals

    def run(x, dout, factor, *p_):
        dim = x.shape[-1]
        rows = (x.reshape(-1, dim), dout.reshape(-1, dim), _per_row(x, factor))
        dx, grads = _backward_call(*rows, p_, eps, interpret)
        return (dx.reshape(x.shape),), tuple(grads)

    (dx,), grads = tpu.per_device(run, (x, dout.astype(x.dtype), factor), tuple(p))
    return dx, jnp.zeros_like(factor), type(p)(*grads)


mlp_half.defvjp(_mlp_half_fwd, _mlp_half_bwd)
