"""Mask-unit attention on NVIDIA GPUs straight from the qkv projection: Pallas Triton kernels.

cuDNN's flash attention (`attention.cudnn_attention`) takes `[B·windows, n, heads, d]` arrays, but
in Hiera's unrolled token order a mask unit's tokens are every `windows`-th row of the
projection's `[B, N, 3·C]` output. Feeding cuDNN costs a copy of q, k, v into its layout (with
the query pooling), one of the output back, and the same for the gradients: on the base finetune
step's first block, 8.4 of the attention's 31 MB per image. Here one program per (image, window,
head) reads its window's q, k and v where they are (a strided block of the projection), keeps
the `[n_q, n_k]` logits in registers, and writes its output rows where the next projection reads
them; the backward recomputes the softmax (no logits, statistics or output saved) and writes
dq (through the query pooling), dk and dv into one `[B, N, 3·C]` gradient, in place.

Triton's blocks are powers of two, its matmuls at least 16 on a side: windows of 16, 32, 64...
keys (Hiera's first two stages at 224, and the pooling block after them, whose windows keep 4
queries: those products are broadcast multiplies), head dims in chunks of 16 or more (96 = 3 x
32). Global attention stays with cuDNN. Off a GPU the kernels run in Pallas' interpreter
(`interpret=True`: the tests' float32 check against XLA's path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hiera_jax.models.kernels import tpu

MIN_BLOCK = 16  # Triton's smallest matmul side
MAX_WINDOW = 128  # the [n_q, n_k] block lives in registers


def _pow2(n: int, least: int = MIN_BLOCK) -> bool:
    return n >= least and n & (n - 1) == 0


def _chunk(d: int) -> int | None:
    chunk = 64
    while chunk >= MIN_BLOCK and d % chunk:
        chunk //= 2
    return chunk if chunk >= MIN_BLOCK else None


def kernel_fits(dtype, windows: int, n_k: int, q_stride: int, head_dim: int) -> bool:
    """Whether these windows take the kernels: several windows (global attention keeps cuDNN),
    power-of-two lengths (keys 16 to 128, queries 4 or more), the head dim in chunks of 16 or
    more, 16-bit inputs."""
    n_q = n_k // q_stride
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and windows > 1
        and _pow2(n_q, 4)  # fewer than 16 queries: products by broadcast (`_dot`)
        and _pow2(n_k)
        and n_k <= MAX_WINDOW
        and _chunk(head_dim) is not None
    )


def _dot(a, b, contract=((1,), (0,))):
    """A 2-D product with f32 accumulation: Triton's matmul where both sides are at least 16
    long, else (a pooled window's 4 queries) a broadcast multiply and sum, in f32."""
    (ca,), (cb,) = contract
    if min(a.shape[1 - ca], b.shape[1 - cb], a.shape[ca]) >= MIN_BLOCK:
        return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)
    a = (a if ca == 1 else a.T).astype(jnp.float32)  # [m, k]
    b = (b if cb == 0 else b.T).astype(jnp.float32)  # [k, n]
    return (a[:, :, None] * b[None, :, :]).sum(axis=1)


def _load_q(qkv_ref, q_stride: int, n_q: int, cols):
    """The window's queries of one column chunk, each the max of its q_stride candidates (in the
    input dtype, as XLA's path pools): (pooled [n_q, c], the candidates)."""
    candidates = [qkv_ref[pl.ds(s * n_q, n_q), 0, cols] for s in range(q_stride)]
    pooled = candidates[0]
    for c in candidates[1:]:
        pooled = jnp.maximum(pooled, c)
    return pooled, candidates


def _softmax(qkv_ref, q_stride: int, n_q: int, c: int, chunks: int, scale: float):
    """q (pooled, scaled in its dtype), (pooled q, its candidates), k and v chunks, and the
    unnormalised probabilities with their row sums, f32, as `attention.xla_attention` computes
    them."""
    qs, cands, ks, vs = [], [], [], []
    logits = None
    for j in range(chunks):
        cols = pl.ds(j * c, c)
        pooled, cand = _load_q(qkv_ref, q_stride, n_q, cols)
        q = pooled * jnp.asarray(scale, pooled.dtype)
        k, v = qkv_ref[:, 1, cols], qkv_ref[:, 2, cols]
        part = _dot(q, k, ((1,), (1,)))  # q kᵀ
        logits = part if logits is None else logits + part
        qs.append(q), cands.append((pooled, cand)), ks.append(k), vs.append(v)
    p = jnp.exp(logits - logits.max(axis=1, keepdims=True))
    return qs, cands, ks, vs, p, p.sum(axis=1, keepdims=True)


def _forward_kernel(qkv_ref, o_ref, *, q_stride, c, scale):
    n_q, d = o_ref.shape
    chunks = d // c
    _, _, _, vs, p, total = _softmax(qkv_ref, q_stride, n_q, c, chunks, scale)
    for j in range(chunks):
        out = _dot(p.astype(vs[j].dtype), vs[j]) / total
        o_ref[:, pl.ds(j * c, c)] = out.astype(o_ref.dtype)


def _backward_kernel(qkv_ref, do_ref, dqkv_ref, *, q_stride, c, scale):
    n_q, d = do_ref.shape
    chunks = d // c
    qs, cands, ks, vs, p, total = _softmax(qkv_ref, q_stride, n_q, c, chunks, scale)
    p = p / total
    dos = [do_ref[:, pl.ds(j * c, c)] for j in range(chunks)]
    dp = None
    for j in range(chunks):
        part = _dot(dos[j], vs[j], ((1,), (1,)))  # do vᵀ
        dp = part if dp is None else dp + part
    # Softmax's backward; Σ_k p·dp equals rowsum(do · o), so the output need not be saved.
    ds = (p * (dp - (p * dp).sum(axis=1, keepdims=True))).astype(qs[0].dtype)
    for j in range(chunks):
        cols = pl.ds(j * c, c)
        dq = _dot(ds, ks[j]) * scale  # through q's scaling
        dqkv_ref[:, 1, cols] = _dot(ds, qs[j], ((0,), (0,))).astype(dqkv_ref.dtype)  # dsᵀ q
        dqkv_ref[:, 2, cols] = _dot(p.astype(dos[j].dtype), dos[j], ((0,), (0,))).astype(
            dqkv_ref.dtype
        )  # pᵀ do
        if q_stride == 1:
            dqkv_ref[:, 0, cols] = dq.astype(dqkv_ref.dtype)
            continue
        # The max-pool's backward as jax differentiates a max: the gradient split evenly
        # between tied candidates.
        pooled, candidates = cands[j]  # this chunk's pooled queries and their candidates
        hits = [(cand == pooled).astype(jnp.float32) for cand in candidates]
        count = sum(hits)
        for s, hit in enumerate(hits):
            dqkv_ref[pl.ds(s * n_q, n_q), 0, cols] = (dq * hit / count).astype(dqkv_ref.dtype)


def _specs(batch, tokens, windows, heads, d, q_stride):
    n_k = tokens // windows
    n_q = n_k // q_stride
    # [B, n, w, 3, h, d] and [B, n_q, w, h, d] views: one program's block is its window's
    # rows (every w-th token) and its head's columns.
    qkv = pl.BlockSpec((None, n_k, None, 3, None, d), lambda b, w, h: (b, 0, w, 0, h, 0))
    out = pl.BlockSpec((None, n_q, None, None, d), lambda b, w, h: (b, 0, w, h, 0))
    return (batch, windows, heads), qkv, out, n_q, n_k


def _cost(batch, windows, heads, n_q, n_k, d, matmuls, nbytes) -> pl.CostEstimate:
    pairs = batch * windows * heads * n_q * n_k * d
    return pl.CostEstimate(
        flops=2 * pairs * matmuls,
        transcendentals=batch * windows * heads * n_q * n_k,
        bytes_accessed=nbytes,
    )


def _forward_call(qkv, heads, windows, scale, q_stride, interpret):
    batch, tokens, channels = qkv.shape
    d = channels // (3 * heads)
    grid, qkv_spec, out_spec, n_q, n_k = _specs(batch, tokens, windows, heads, d, q_stride)
    view = qkv.reshape(batch, n_k, windows, 3, heads, d)
    out = pl.pallas_call(
        functools.partial(_forward_kernel, q_stride=q_stride, c=_chunk(d), scale=scale),
        grid=grid,
        in_specs=[qkv_spec],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((batch, n_q, windows, heads, d), qkv.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        cost_estimate=_cost(
            batch, windows, heads, n_q, n_k, d, 2, qkv.size * qkv.dtype.itemsize * 4 // 3
        ),
        interpret=interpret,
        name="hiera_window_attention_fwd",
    )(view)
    return out.reshape(batch, n_q * windows, heads * d)


def _backward_call(qkv, dout, heads, windows, scale, q_stride, interpret):
    batch, tokens, channels = qkv.shape
    d = channels // (3 * heads)
    grid, qkv_spec, out_spec, n_q, n_k = _specs(batch, tokens, windows, heads, d, q_stride)
    view = qkv.reshape(batch, n_k, windows, 3, heads, d)
    dview = dout.reshape(batch, n_q, windows, heads, d)
    dqkv = pl.pallas_call(
        functools.partial(_backward_kernel, q_stride=q_stride, c=_chunk(d), scale=scale),
        grid=grid,
        in_specs=[qkv_spec, out_spec],
        out_specs=qkv_spec,
        out_shape=jax.ShapeDtypeStruct(view.shape, qkv.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        # q kᵀ again and four products (dp, dq, dk, dv)
        cost_estimate=_cost(
            batch, windows, heads, n_q, n_k, d, 5, (2 * qkv.size + dout.size) * qkv.dtype.itemsize
        ),
        interpret=interpret,
        name="hiera_window_attention_bwd",
    )(view, dview)
    return dqkv.reshape(qkv.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def window_attention(
    qkv: jnp.ndarray,
    heads: int,
    windows: int,
    scale: float,
    q_stride: int = 1,
    interpret: bool = False,
) -> jnp.ndarray:
    """`attention.attention` on a GPU for windows `kernel_fits` takes: qkv [B, N, 3·C] ->
    [B, N / q_stride, C], per device under a mesh."""

    def run(qkv):
        return (_forward_call(qkv, heads, windows, scale, q_stride, interpret),), ()

    return tpu.per_device(run, (qkv,))[0][0]


def _window_attention_fwd(qkv, heads, windows, scale, q_stride, interpret):
    return window_attention(qkv, heads, windows, scale, q_stride, interpret), qkv


def _window_attention_bwd(heads, windows, scale, q_stride, interpret, qkv, dout):
    def run(qkv, dout):
        grad = _backward_call(qkv, dout, heads, windows, scale, q_stride, interpret)
        return (grad,), ()

    return (tpu.per_device(run, (qkv, dout.astype(qkv.dtype)))[0][0],)


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)
