"""Attention on NVIDIA GPUs straight from the qkv projection: Pallas Triton kernels.

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
32). One global window (the last stages, the MAE decoder) has kernels of its own below, its
length masked to a power of two: up to 256 tokens; longer windows stay with cuDNN. Off a GPU the
kernels run in Pallas' interpreter (`interpret=True`: the tests' float32 check against XLA's
path). Measured only as compiled here, without a GPU: bytes, not speed; tiles chosen by rule.
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
        pooled, candidates = cands[j]  # this chunk's pooled queries and their candidates
        for s, share in enumerate(_tie_shares(dq, pooled, candidates)):
            dqkv_ref[pl.ds(s * n_q, n_q), 0, cols] = share.astype(dqkv_ref.dtype)


def _tie_shares(dq, pooled, candidates):
    """The max-pool's backward as jax differentiates a max: each candidate's share of dq, the
    gradient split evenly between tied candidates."""
    hits = [(cand == pooled).astype(jnp.float32) for cand in candidates]
    count = sum(hits)
    return [dq * hit / count for hit in hits]


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


# ============================================================================ global attention
# One window of n tokens (Hiera's last two stages, the MAE decoder): n is rarely a power of two
# (196, 76, 49), so the keys are read as one block of the next power of two, masked, and the
# queries in blocks of up to 64. cuDNN takes these too, but through copies of q, k and v out of
# the projection (and of their gradients back): the base finetune step's global stages spent
# 32 of their MB per image on those copies. The backward is one program per (image, head), so
# that it writes the [B, N, 3·C] gradient once: dq query block by query block (keeping each
# block's log-sum-exp and Σ p·dp), then dk and dv key block by key block, FlashAttention-2's
# way, summed over the query blocks. q kᵀ and do vᵀ are computed twice in the backward.
GLOBAL_MAX_KEYS = 256  # a [64, 256] f32 logits block in registers
GLOBAL_BLOCK = 64
_MASKED = -1e30


def _next_pow2(n: int) -> int:
    return max(MIN_BLOCK, 1 << (n - 1).bit_length())


def global_fits(dtype, windows: int, n_k: int, q_stride: int, head_dim: int) -> bool:
    """Whether one global window (windows == 1) takes the global kernels: up to 256 keys, the
    head dim in chunks of 16 or more, 16-bit inputs."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and windows == 1
        and n_k <= GLOBAL_MAX_KEYS
        and n_k % q_stride == 0
        and _chunk(head_dim) is not None
    )


def _global_sizes(n_k: int, q_stride: int):
    n_q = n_k // q_stride
    keys = _next_pow2(n_k)
    block_q = min(GLOBAL_BLOCK, _next_pow2(n_q))
    block_k = min(GLOBAL_BLOCK, keys)
    return n_q, keys, block_q, block_k


def _below(start, size: int, limit: int):
    """Which of the rows start..start+size are < limit (the rest is padding, masked)."""
    return start + jnp.arange(size) < limit


def _index(index):
    """Integer indices as int32 scalars: Pallas' interpreter takes no Python int in a masked
    load's or store's index."""
    return tuple(jnp.int32(i) if isinstance(i, int) else i for i in index)


def _load(ref, index, mask):
    return plgpu.load(ref.at[_index(index)], mask=mask[:, None], other=0.0)


def _store(ref, index, value, mask):
    plgpu.store(ref.at[_index(index)], value.astype(ref.dtype), mask=mask[:, None])


def _pooled_queries(qkv_ref, i, n_q, block_q, q_stride, cols, scale):
    """Query block i of one column chunk, pooled over its q_stride candidates and scaled in its
    dtype: (scaled q, pooled q, the candidates, row mask)."""
    valid = _below(i * block_q, block_q, n_q)
    candidates = [
        _load(qkv_ref, (pl.ds(s * n_q + i * block_q, block_q), 0, cols), valid)
        for s in range(q_stride)
    ]
    pooled = candidates[0]
    for cand in candidates[1:]:
        pooled = jnp.maximum(pooled, cand)
    return pooled * jnp.asarray(scale, pooled.dtype), pooled, candidates, valid


def _global_logits(qkv_ref, i, n_q, n_k, keys, block_q, q_stride, c, chunks, scale):
    """Logits of query block i against every key (invalid keys masked), f32, with the chunks."""
    key_ok = _below(0, keys, n_k)
    qs, pooled, ks, vs, logits, valid = [], [], [], [], None, None
    for j in range(chunks):
        cols = pl.ds(j * c, c)
        q, p_, cands, valid = _pooled_queries(qkv_ref, i, n_q, block_q, q_stride, cols, scale)
        k = _load(qkv_ref, (pl.ds(0, keys), 1, cols), key_ok)
        v = _load(qkv_ref, (pl.ds(0, keys), 2, cols), key_ok)
        part = _dot(q, k, ((1,), (1,)))
        logits = part if logits is None else logits + part
        qs.append(q), pooled.append((p_, cands)), ks.append(k), vs.append(v)
    logits = jnp.where(key_ok[None, :], logits, _MASKED)
    return qs, pooled, ks, vs, logits, valid


def _softmax_rows(logits):
    """(probabilities, log-sum-exp) of each row, f32."""
    top = logits.max(axis=1, keepdims=True)
    p = jnp.exp(logits - top)
    total = p.sum(axis=1, keepdims=True)
    return p / total, top + jnp.log(total)


def _global_forward_kernel(qkv_ref, o_ref, *, n_q, n_k, q_stride, c, scale):
    block_q, d = o_ref.shape
    keys = _next_pow2(n_k)
    i = pl.program_id(2)
    _, _, _, vs, logits, valid = _global_logits(
        qkv_ref, i, n_q, n_k, keys, block_q, q_stride, c, d // c, scale
    )
    p = jnp.exp(logits - logits.max(axis=1, keepdims=True))
    total = p.sum(axis=1, keepdims=True)
    for j in range(d // c):  # normalised after the product, as XLA's path does
        out = _dot(p.astype(vs[j].dtype), vs[j]) / total
        _store(o_ref, (slice(None), pl.ds(j * c, c)), out, valid)


def _global_backward_kernel(qkv_ref, do_ref, dqkv_ref, *, n_q, n_k, q_stride, c, scale):
    """One (image, head): dq block by block of queries, keeping each block's log-sum-exp and
    Σ p·dp, then dk and dv block by block of keys, summed over the query blocks."""
    d = do_ref.shape[1]
    chunks = d // c
    _, keys, block_q, block_k = _global_sizes(n_k, q_stride)
    blocks_q, blocks_k = -(-n_q // block_q), -(-n_k // block_k)
    stats = []
    for i in range(blocks_q):
        _, pooled, ks, vs, logits, valid = _global_logits(
            qkv_ref, i, n_q, n_k, keys, block_q, q_stride, c, chunks, scale
        )
        p, lse = _softmax_rows(logits)
        qrows = pl.ds(i * block_q, block_q)
        dos = [_load(do_ref, (qrows, pl.ds(j * c, c)), valid) for j in range(chunks)]
        dp = sum(_dot(dos[j], vs[j], ((1,), (1,))) for j in range(chunks))  # do vᵀ
        delta = (p * dp).sum(axis=1, keepdims=True)  # Σ_k p·dp = rowsum(do · o)
        stats.append((lse, delta))
        ds = (p * (dp - delta)).astype(ks[0].dtype)
        for j in range(chunks):
            cols = pl.ds(j * c, c)
            dq = _dot(ds, ks[j]) * scale
            shares = _tie_shares(dq, *pooled[j]) if q_stride > 1 else [dq]
            for s, share in enumerate(shares):
                rows = pl.ds(s * n_q + i * block_q, block_q)
                _store(dqkv_ref, (rows, 0, cols), share, valid)
    for kb in range(blocks_k):
        key_ok = _below(kb * block_k, block_k, n_k)
        krows = pl.ds(kb * block_k, block_k)
        ks = [_load(qkv_ref, (krows, 1, pl.ds(j * c, c)), key_ok) for j in range(chunks)]
        vs = [_load(qkv_ref, (krows, 2, pl.ds(j * c, c)), key_ok) for j in range(chunks)]
        dk = [jnp.zeros((block_k, c), jnp.float32) for _ in range(chunks)]
        dv = [jnp.zeros((block_k, c), jnp.float32) for _ in range(chunks)]
        for i, (lse, delta) in enumerate(stats):
            qrows = pl.ds(i * block_q, block_q)
            qs, valid = [], None
            for j in range(chunks):
                cols = pl.ds(j * c, c)
                q, _, _, valid = _pooled_queries(qkv_ref, i, n_q, block_q, q_stride, cols, scale)
                qs.append(q)
            logits = sum(_dot(qs[j], ks[j], ((1,), (1,))) for j in range(chunks))
            p = jnp.where(key_ok[None, :], jnp.exp(logits - lse), 0.0)
            dos = [_load(do_ref, (qrows, pl.ds(j * c, c)), valid) for j in range(chunks)]
            dp = sum(_dot(dos[j], vs[j], ((1,), (1,))) for j in range(chunks))
            ds = (p * (dp - delta)).astype(qs[0].dtype)
            pt = p.astype(dos[0].dtype)
            for j in range(chunks):
                dk[j] = dk[j] + _dot(ds, qs[j], ((0,), (0,)))  # dsᵀ q
                dv[j] = dv[j] + _dot(pt, dos[j], ((0,), (0,)))  # pᵀ do
        for j in range(chunks):
            cols = pl.ds(j * c, c)
            _store(dqkv_ref, (krows, 1, cols), dk[j], key_ok)
            _store(dqkv_ref, (krows, 2, cols), dv[j], key_ok)


def _global_call(qkv, heads, scale, q_stride, interpret, dout=None):
    """The forward (`dout` None: [B, n_q, C]) or the backward ([B, N, 3·C]) kernel."""
    batch, n_k, channels = qkv.shape
    d = channels // (3 * heads)
    n_q, keys, block_q, _ = _global_sizes(n_k, q_stride)
    blocks_q = -(-n_q // block_q)
    view = qkv.reshape(batch, n_k, 3, heads, d)
    # [B, N, 3, h, d] view, the key axis as one block of `keys` rows (the padding masked).
    qkv_spec = pl.BlockSpec((None, keys, 3, None, d), lambda b, h, *_: (b, 0, 0, h, 0))
    kwargs = dict(n_q=n_q, n_k=n_k, q_stride=q_stride, c=_chunk(d), scale=scale)
    nbytes = qkv.size * qkv.dtype.itemsize
    if dout is None:
        out = pl.pallas_call(
            functools.partial(_global_forward_kernel, **kwargs),
            grid=(batch, heads, blocks_q),
            in_specs=[qkv_spec],
            out_specs=pl.BlockSpec((None, block_q, None, d), lambda b, h, i: (b, i, h, 0)),
            out_shape=jax.ShapeDtypeStruct((batch, n_q, heads, d), qkv.dtype),
            # the [block_q, keys] f32 logits live in registers: 8 warps from 8K values up
            compiler_params=plgpu.CompilerParams(
                num_warps=8 if block_q * keys > 8192 else 4, num_stages=1
            ),
            cost_estimate=_cost(batch, 1, heads, n_q, n_k, d, 2, nbytes * 4 // 3),
            interpret=interpret,
            name="hiera_global_attention_fwd",
        )(view)
        return out.reshape(batch, n_q, heads * d)
    dview = dout.reshape(batch, n_q, heads, d)
    dqkv = pl.pallas_call(
        functools.partial(_global_backward_kernel, **kwargs),
        grid=(batch, heads),
        in_specs=[
            qkv_spec,
            pl.BlockSpec((None, blocks_q * block_q, None, d), lambda b, h: (b, 0, h, 0)),
        ],
        out_specs=qkv_spec,
        out_shape=jax.ShapeDtypeStruct(view.shape, qkv.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
        # q kᵀ and do vᵀ twice (for dq, then per key block), ds k, dsᵀ q, pᵀ do
        cost_estimate=_cost(batch, 1, heads, n_q, n_k, d, 7, 2 * nbytes + nbytes // 3),
        interpret=interpret,
        name="hiera_global_attention_bwd",
    )(view, dview)
    return dqkv.reshape(qkv.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def global_attention(
    qkv: jnp.ndarray, heads: int, scale: float, q_stride: int = 1, interpret: bool = False
) -> jnp.ndarray:
    """`attention.attention` on a GPU for one global window that `global_fits` takes: qkv
    [B, N, 3·C] -> [B, N / q_stride, C], per device under a mesh."""

    def run(qkv):
        return (_global_call(qkv, heads, scale, q_stride, interpret),), ()

    return tpu.per_device(run, (qkv,))[0][0]


def _global_attention_fwd(qkv, heads, scale, q_stride, interpret):
    return global_attention(qkv, heads, scale, q_stride, interpret), qkv


def _global_attention_bwd(heads, scale, q_stride, interpret, qkv, dout):
    def run(qkv, dout):
        return (_global_call(qkv, heads, scale, q_stride, interpret, dout),), ()

    return (tpu.per_device(run, (qkv, dout.astype(qkv.dtype)))[0][0],)


global_attention.defvjp(_global_attention_fwd, _global_attention_bwd)
