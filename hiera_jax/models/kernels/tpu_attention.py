"""Pallas TPU attention: one window's whole softmax in VMEM, forward and backward.

A Hiera window is small (at most 784 keys in the image models at 224), so one window's whole
[n_q, n_k] block fits in a TPU core's VMEM. These kernels compute the softmax there, with no
online softmax, and their backward recomputes it from q, k and v, so nothing of size [n_q, n_k]
reaches HBM and no logits, statistics or output are saved:
- the token kernel (`sharded_tokens`): straight from the projection's [B, N, 3·C] output, query
  pooling included, to [B, N / q_stride, C], with no relayout;
- `pallas_attention` (`sharded_pallas`): on [B, w, h, n, d] arrays, where the token kernel's
  image does not fit.
Windows too large for VMEM take JAX's own Pallas flash attention (`flash_window_attention`:
online softmax over 128-512-token tiles) where a tile divides their lengths.
`hiera_jax.models.attention` picks among them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hiera_jax.models.kernels import tpu

# Bytes of f32 [n_q, n_k] blocks one grid step may hold: the backward keeps three per window
# (probabilities, their gradient, and a temporary) beside q, k, v and their gradients. v5e's
# default scoped VMEM limit is 16 MiB.
VMEM_BLOCK_BUDGET = 6 * 2**20
MAX_WINDOWS_PER_STEP = 8  # windows per grid step: amortises the step overhead, unrolled in code


def kernel_fits(n_q: int, n_k: int) -> bool:
    """Whether one window's softmax (three f32 [n_q, n_k] blocks) fits the kernel's budget."""
    return 3 * 4 * n_q * n_k <= VMEM_BLOCK_BUDGET


FLASH_BLOCKS = (512, 256, 128)  # tried in order: the largest that divides both lengths


def flash_block(n_q: int, n_k: int) -> int | None:
    """The flash kernel's tile for windows too large for VMEM (SAM 2's global blocks, video
    models' global stages), or None when no tile divides both lengths (XLA's path then)."""
    return next((b for b in FLASH_BLOCKS if n_q % b == 0 and n_k % b == 0), None)


def sharded_flash(q, k, v, *, scale: float, block: int) -> jnp.ndarray:
    run = functools.partial(flash_window_attention, scale=scale, block=block)
    return _per_device(run, q, k, v)


def flash_window_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float, block: int
) -> jnp.ndarray:
    """JAX's Pallas TPU flash attention (online softmax over `block`-token tiles, backward
    recomputing them) on [B, w, h, n, d] windows: no [n_q, n_k] block reaches HBM, however large
    the window. Off TPU it runs under `pltpu.set_tpu_interpret_mode()` only (the tests)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    shape = q.shape
    b, w, h = shape[:3]
    flat = [a.reshape(b * w, h, *a.shape[3:]) for a in (q, k, v)]  # [B·w, h, n, d]: free
    sizes = fa.BlockSizes(
        block_q=block,
        block_k_major=block,
        block_k=block,
        block_b=1,
        block_q_major_dkv=block,
        block_k_major_dkv=block,
        block_k_dkv=block,
        block_q_dkv=block,
        block_k_major_dq=block,
        block_k_dq=block,
        block_q_dq=block,
    )
    return fa.flash_attention(*flat, sm_scale=scale, block_sizes=sizes).reshape(shape)


def sharded_pallas(q, k, v, *, scale: float, interpret: bool) -> jnp.ndarray:
    run = functools.partial(pallas_attention, scale=scale, interpret=interpret)
    return _per_device(run, q, k, v)


def _per_device(run, *arrays: jnp.ndarray) -> jnp.ndarray:
    """`run(*arrays)` on each device's share of the batch (`tpu.per_device`)."""
    split, _ = tpu.per_device(lambda *a: ((run(*a),), ()), arrays)
    return split[0]


def pallas_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float, interpret: bool = False
) -> jnp.ndarray:
    """The Pallas TPU kernel on [B, w, h, n, d] windows (`interpret`: run it on any backend)."""
    shape = q.shape
    flat = [a.reshape(-1, *a.shape[3:]) for a in (q, k, v)]  # [B·w·h, n, d]: a free reshape
    return _attention(*flat, scale, interpret).reshape(shape)


def _probabilities(q: jnp.ndarray, k: jnp.ndarray, scale: float):
    """Unnormalised exp(s - max s) of one window, and its row sums: [n_q, n_k], [n_q, 1]."""
    s = tpu.dot(q, k, ((1,), (1,))) * scale
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    return p, p.sum(axis=-1, keepdims=True)


def _one_window(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float) -> jnp.ndarray:
    """softmax(q kᵀ · scale) v of one window and head, f32: [n_q, d]."""
    p, total = _probabilities(q, k, scale)
    return tpu.dot(p.astype(v.dtype), v, ((1,), (0,))) / total


def _one_window_grads(q, k, v, do, scale: float):
    """(dq, dk, dv) of `_one_window`, f32, from q, k, v and the output's gradient alone."""
    p, total = _probabilities(q, k, scale)
    p = p / total
    dp = tpu.dot(do, v, ((1,), (1,)))  # [n_q, n_k]
    # Softmax's backward; Σ_k p·dp equals rowsum(do · o), so the output need not be saved.
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dq = tpu.dot(ds.astype(k.dtype), k, ((1,), (0,))) * scale
    dk = tpu.dot(ds.astype(q.dtype), q, ((0,), (0,))) * scale
    dv = tpu.dot(p.astype(do.dtype), do, ((0,), (0,)))  # pᵀ do
    return dq, dk, dv


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *, scale: float, windows: int) -> None:
    for i in range(windows):
        o_ref[i] = _one_window(q_ref[i], k_ref[i], v_ref[i], scale).astype(o_ref.dtype)


def _backward_kernel(
    q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, scale: float, windows: int
) -> None:
    for i in range(windows):
        grads = _one_window_grads(q_ref[i], k_ref[i], v_ref[i], do_ref[i], scale)
        for ref, grad in zip((dq_ref, dk_ref, dv_ref), grads):
            ref[i] = grad.astype(ref.dtype)


def _windows_per_step(count: int, n_q: int, n_k: int) -> int:
    """The largest divisor of `count` up to MAX_WINDOWS_PER_STEP whose blocks fit the budget."""
    g = max(1, min(count, MAX_WINDOWS_PER_STEP, VMEM_BLOCK_BUDGET // (3 * 4 * n_q * n_k)))
    while count % g:
        g -= 1
    return g


def _call(kernel, inputs, outputs, flops: int, interpret: bool):
    """`kernel` over blocks of whole windows: [G, n, d] arrays, G split across the grid."""
    count, n_q, n_k = inputs[0].shape[0], inputs[0].shape[1], inputs[1].shape[1]
    g = _windows_per_step(count, n_q, n_k)

    def spec(a):
        return pl.BlockSpec((g, *a.shape[1:]), lambda i: (i, 0, 0))

    nbytes = sum(a.size * a.dtype.itemsize for a in (*inputs, *outputs))
    return pl.pallas_call(
        functools.partial(kernel, windows=g),
        grid=(count // g,),
        in_specs=[spec(a) for a in inputs],
        out_specs=[spec(a) for a in outputs],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in outputs],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        # What the kernel really does, so XLA's cost analysis of the program still sees it.
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=count * n_q * n_k, bytes_accessed=nbytes
        ),
        interpret=interpret,  # the plain interpreter: no callbacks, so it works under remat
    )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, scale: float, interpret: bool):
    flops = 4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]  # q kᵀ and p v
    kernel = functools.partial(_forward_kernel, scale=scale)
    return _call(kernel, (q, k, v), (q,), flops, interpret)[0]


def _attention_fwd(q, k, v, scale, interpret):
    return _attention(q, k, v, scale, interpret), (q, k, v)


def _attention_bwd(scale, interpret, residuals, do):
    q, k, v = residuals
    flops = 10 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]  # q kᵀ again + four matmuls
    kernel = functools.partial(_backward_kernel, scale=scale)
    return tuple(_call(kernel, (q, k, v, do.astype(q.dtype)), (q, k, v), flops, interpret))


_attention.defvjp(_attention_fwd, _attention_bwd)


# Attention straight from the qkv projection's layout.
#
# The window kernel above still needs q, k and v as [B·w·h, n, d]: XLA's transposes from the
# projection's [B, N, 3·C] (and back to [B, N, C]) are relayouts of tiled arrays that moved more
# bytes than the kernel itself. `attention` reads the projection's output as it is: a grid step
# holds one image's [N, 3·C] tokens, a head is a column range, a window every w-th row (the
# window index is the fast axis of an unrolled sequence), and the output and its gradient are
# written in the same layouts. Mosaic loads strided rows only from 32-bit arrays 128 lanes wide,
# so with windows each head's columns are first copied into their own f32 [N, 128] slot in VMEM
# (VMEM traffic, not HBM).


def token_kernel_fits(qkv: jnp.ndarray, heads: int, windows: int, scale: float, q_stride: int):
    """Whether the backward's VMEM (double-buffered blocks, f32 head slots, the [n_q, n_k]
    temporaries) fits in 4/5 of the kernel's VMEM limit; slots need d <= 128."""
    del scale
    tokens, channels = qkv.shape[1:]
    d, n_k = channels // (3 * heads), tokens // windows
    n_q = n_k // q_stride
    item = jnp.dtype(qkv.dtype).itemsize
    pooled = tokens // q_stride
    blocks = 2 * (2 * tokens * tpu.lanes(channels) + pooled * tpu.lanes(channels // 3)) * item
    slotted = windows > 1 or q_stride > 1
    slots = heads * (6 * tokens + pooled) * 128 * 4 if slotted else 0
    temporaries = 6 * tpu.lanes(n_k) * max(n_q, 8) * 4
    fits = blocks + slots + temporaries <= 0.8 * tpu.vmem_limit()
    return fits and kernel_fits(n_q, n_k) and (d <= 128 or not slotted)


def sharded_tokens(qkv, *, heads, windows, scale, q_stride, interpret: bool) -> jnp.ndarray:
    run = functools.partial(
        _token_attention,
        heads=heads,
        windows=windows,
        scale=scale,
        q_stride=q_stride,
        interpret=interpret,
    )
    return _per_device(run, qkv)


class _Heads:
    """One image's heads as the kernels read and write them: the block's own column ranges
    (plain global attention), or f32 [N, 128] VMEM slots, one per head part (strided or
    unaligned row loads need them)."""

    def __init__(self, block, slots, d: int, windows: int):
        self.block, self.slots, self.d, self.windows = block, slots, d, windows

    def fill(self) -> None:
        for i in range(self.slots.shape[0] if self.slots is not None else 0):
            cols = self.block[0, :, pl.ds(i * self.d, self.d)]
            self.slots[i, :, pl.ds(0, self.d)] = cols.astype(jnp.float32)

    def _rows(self, window, count: int, first: int):
        """`count` rows of `window` from its `first`-th token: every `windows`-th row."""
        if self.windows == 1:
            return pl.ds(first, count)
        return pl.ds(first * self.windows + window, count, stride=self.windows)

    def read(self, i: int, window, count: int, dtype, first: int = 0) -> jnp.ndarray:
        """Head part `i` (q, k, v of head h: h, heads + h, 2·heads + h) of `window`: [count, d]."""
        if self.slots is None:
            return self.block[0, pl.ds(first, count), pl.ds(i * self.d, self.d)].astype(dtype)
        rows = self.slots.at[i][self._rows(window, count, first), :]
        return rows[:, : self.d].astype(dtype)

    def write(self, i: int, window, value: jnp.ndarray, first: int = 0) -> None:
        count = value.shape[0]
        if self.slots is None:
            cols = pl.ds(i * self.d, self.d)
            self.block[0, pl.ds(first, count), cols] = value.astype(self.block.dtype)
            return
        if self.d < 128:  # a strided store writes whole 128-lane rows
            value = jnp.concatenate([value, jnp.zeros((count, 128 - self.d), value.dtype)], 1)
        self.slots.at[i][self._rows(window, count, first), :] = value

    def flush(self) -> None:
        for i in range(self.slots.shape[0] if self.slots is not None else 0):
            cols = self.slots[i, :, pl.ds(0, self.d)]
            self.block[0, :, pl.ds(i * self.d, self.d)] = cols.astype(self.block.dtype)


def _over_windows(windows: int, body) -> None:
    if windows == 1:
        body(0)
    else:
        lax.fori_loop(0, windows, lambda w, c: (body(w), c)[1], 0)


def _pooled_queries(qkv_in: _Heads, h: int, window, n_q: int, q_stride: int, dtype):
    """Head h's queries of `window`, max-pooled over its q_stride leading chunks, and the
    chunks themselves (the max's backward needs them)."""
    chunks = [qkv_in.read(h, window, n_q, dtype, first=c * n_q) for c in range(q_stride)]
    q = chunks[0]
    for chunk in chunks[1:]:
        q = jnp.maximum(q, chunk)
    return q, chunks


def _token_forward_kernel(qkv_ref, o_ref, *slots, heads, windows, q_stride, n_k, d, scale):
    dtype, n_q = qkv_ref.dtype, n_k // q_stride
    qkv_in = _Heads(qkv_ref, slots[0] if slots else None, d, windows)
    out = _Heads(o_ref, slots[1] if slots else None, d, windows)
    qkv_in.fill()

    def body(window):
        for h in range(heads):
            q, _ = _pooled_queries(qkv_in, h, window, n_q, q_stride, dtype)
            k, v = (qkv_in.read(i * heads + h, window, n_k, dtype) for i in (1, 2))
            out.write(h, window, _one_window(q, k, v, scale))

    _over_windows(windows, body)
    out.flush()


def _token_backward_kernel(
    qkv_ref, do_ref, dqkv_ref, *slots, heads, windows, q_stride, n_k, d, scale
):
    dtype, n_q = qkv_ref.dtype, n_k // q_stride
    qkv_in, do_in, dqkv = (
        _Heads(ref, slots[i] if slots else None, d, windows)
        for i, ref in enumerate((qkv_ref, do_ref, dqkv_ref))
    )
    qkv_in.fill()
    do_in.fill()

    def body(window):
        for h in range(heads):
            q, chunks = _pooled_queries(qkv_in, h, window, n_q, q_stride, dtype)
            k, v = (qkv_in.read(i * heads + h, window, n_k, dtype) for i in (1, 2))
            do = do_in.read(h, window, n_q, dtype)
            dq, dk, dv = _one_window_grads(q, k, v, do, scale)
            if q_stride == 1:
                dqkv.write(h, window, dq)
            else:  # the max's gradient, split evenly between tied chunks (as jax's max does)
                hits = [(chunk == q).astype(jnp.float32) for chunk in chunks]
                share = dq / sum(hits)
                for c, hit in enumerate(hits):
                    dqkv.write(h, window, share * hit, first=c * n_q)
            dqkv.write(heads + h, window, dk)
            dqkv.write(2 * heads + h, window, dv)

    _over_windows(windows, body)
    dqkv.flush()


def _token_call(kernel, inputs, out_shapes, heads: int, slotted: bool, flops: int, interpret):
    """`kernel` with one image per grid step (and f32 head slots in VMEM when `slotted`)."""
    batch = inputs[0].shape[0]
    d = inputs[0].shape[2] // (3 * heads)

    def spec(shape):
        return pl.BlockSpec((1, *shape[1:]), lambda b: (b, 0, 0))

    arrays = (*inputs, *out_shapes)
    slots = [pltpu.VMEM((a.shape[2] // d, a.shape[1], 128), jnp.float32) for a in arrays]
    nbytes = sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays)
    return pl.pallas_call(
        kernel,
        grid=(batch,),
        in_specs=[spec(a.shape) for a in inputs],
        out_specs=[spec(a.shape) for a in out_shapes],
        out_shape=list(out_shapes),
        scratch_shapes=slots if slotted else [],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=tpu.vmem_limit()
        ),
        # What the kernel does, so that XLA's cost analysis of the program still sees it.
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
        interpret=interpret,
    )(*inputs)


def _token_options(qkv, heads, windows, q_stride, scale):
    batch, tokens, channels = qkv.shape
    n_k = tokens // windows
    kernel_args = dict(
        heads=heads,
        windows=windows,
        q_stride=q_stride,
        n_k=n_k,
        d=channels // (3 * heads),
        scale=scale,
    )
    out = jax.ShapeDtypeStruct((batch, tokens // q_stride, channels // 3), qkv.dtype)
    matmul = 2 * out.size * n_k  # one [n_q, n_k, d] matmul over every window and head
    return kernel_args, out, matmul, windows > 1 or q_stride > 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _token_attention(qkv, heads: int, windows: int, scale: float, q_stride: int, interpret):
    kernel_args, out, matmul, slotted = _token_options(qkv, heads, windows, q_stride, scale)
    kernel = functools.partial(_token_forward_kernel, **kernel_args)
    return _token_call(kernel, (qkv,), (out,), heads, slotted, 2 * matmul, interpret)[0]


def _token_attention_fwd(qkv, heads, windows, scale, q_stride, interpret):
    return _token_attention(qkv, heads, windows, scale, q_stride, interpret), qkv


def _token_attention_bwd(heads, windows, scale, q_stride, interpret, qkv, do):
    kernel_args, _, matmul, slotted = _token_options(qkv, heads, windows, q_stride, scale)
    kernel = functools.partial(_token_backward_kernel, **kernel_args)
    dqkv = jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)
    args = (qkv, do.astype(qkv.dtype))
    # q kᵀ again and four matmuls.
    return (_token_call(kernel, args, (dqkv,), heads, slotted, 5 * matmul, interpret)[0],)


_token_attention.defvjp(_token_attention_fwd, _token_attention_bwd)
