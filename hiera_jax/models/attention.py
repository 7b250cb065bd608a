"""Softmax attention within windows, as Hiera's MaskUnitAttention computes it, and which kernel
computes it.

XLA's path (`xla_attention`) writes the f32 logits and probabilities of every window to HBM, and
autodiff reads them back; that and the qkv projection's relayouts into
[3, B, windows, heads, n, d] were most of a Hiera step's memory traffic (BENCHMARKS.md, "Where
the bytes go"). The kernels in `hiera_jax.models.kernels` keep the softmax on chip:
- TPU (`kernels.tpu_attention`): one window's whole softmax in VMEM, read in place from the
  projection's [B, N, 3·C] output, query pooling included (the token kernel), or on
  [B, w, h, n, d] arrays (`window_attention`) where its image does not fit; windows too large
  for VMEM take JAX's Pallas flash attention where a tile divides their lengths.
- NVIDIA GPU, 16-bit programs: Pallas Triton kernels that read the projection in place
  (`kernels.gpu_attention`): mask units of power-of-two size, and one global window of up to 256
  tokens (its length masked); cuDNN's flash attention elsewhere (`kernels.cudnn_attention`).

`kernel="auto"` picks them by the platform a program is compiled for (`lax.platform_dependent`,
so an AOT compile from a CPU host gets them too), and XLA's path on the CPU, where the float32
parity tests run. `kernel="pallas"` forces the TPU kernels everywhere (interpreted off TPU: slow,
for tests), `"xla"` never uses any.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from hiera_jax.models.kernels import gpu_attention, tpu
from hiera_jax.models.kernels.cudnn_attention import (  # noqa: F401 (also named here)
    CUDNN_MAX_HEAD_DIM,
    cudnn_attention,
    cudnn_fits,
    cudnn_present,
)
from hiera_jax.models.kernels.tpu import KERNELS, compiling_for, vmem_capacity  # noqa: F401
from hiera_jax.models.kernels.tpu_attention import (  # noqa: F401 (also named here)
    flash_block,
    flash_window_attention,
    kernel_fits,
    pallas_attention,
    sharded_flash,
    sharded_pallas,
    sharded_tokens,
    token_kernel_fits,
)


def xla_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float, return_probs: bool = False
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Softmax attention as plain XLA ops, the official model's arithmetic: q scaled in its
    dtype, f32 logits, the normalisation after the second matmul (one pass fewer over [q, k]).
    `return_probs` also returns the probabilities [B, w, h, n_q, n_k] (same graph otherwise)."""
    q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("bwhqd,bwhkd->bwhqk", q, k).astype(jnp.float32)
    probs = jnp.exp(logits - lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    denom = probs.sum(axis=-1, keepdims=True)  # [B, w, h, q, 1]
    out = jnp.einsum("bwhqk,bwhkd->bwhqd", probs.astype(v.dtype), v)
    out = out / denom.astype(out.dtype)
    return (out, probs / denom) if return_probs else out


def window_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float, kernel: str = "auto"
) -> jnp.ndarray:
    """softmax(q kᵀ · scale) v per window and head; `kernel` as the module docstring says."""
    tpu.check_kernel(kernel, "attention_kernel")
    if q.ndim != 5 or k.shape != v.shape or q.shape[:3] + q.shape[4:] != k.shape[:3] + k.shape[4:]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} are not [B, w, h, n, d] windows")
    if kernel == "xla":
        return xla_attention(q, k, v, scale)
    if not kernel_fits(q.shape[3], k.shape[3]):
        block = flash_block(q.shape[3], k.shape[3])
        if block is None:
            return xla_attention(q, k, v, scale)
        # Off TPU (kernel="pallas" included) XLA's path: JAX's kernel has no interpreter switch.
        flash = functools.partial(sharded_flash, scale=scale, block=block)
        other = functools.partial(xla_attention, scale=scale)
        return lax.platform_dependent(q, k, v, tpu=flash, default=other)
    compiled = functools.partial(sharded_pallas, scale=scale, interpret=False)
    if kernel == "pallas":
        other = functools.partial(sharded_pallas, scale=scale, interpret=True)
    else:
        other = functools.partial(xla_attention, scale=scale)
    return lax.platform_dependent(q, k, v, tpu=compiled, default=other)


def attention(
    qkv: jnp.ndarray,
    heads: int,
    windows: int,
    scale: float,
    q_stride: int = 1,
    kernel: str = "auto",
    return_probs: bool = False,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Mask-unit attention from the qkv projection: qkv [B, N, 3·C] ([3, heads, d] channels;
    token i·windows + w is window w's i-th) -> [B, N / q_stride, C] in the same token order.

    `q_stride` > 1 max-pools each window's queries over its leading q_stride chunks.
    `return_probs` also returns the probabilities [B, w, h, n_q, n_k] (XLA's path).
    """
    tpu.check_kernel(kernel, "attention_kernel")
    batch, tokens, channels = qkv.shape
    if channels % (3 * heads) or tokens % (windows * q_stride):
        raise ValueError(
            f"qkv {qkv.shape} does not split into 3 x {heads} heads x {windows} windows "
            f"(q_stride {q_stride})"
        )
    options = dict(heads=heads, windows=windows, scale=scale, q_stride=q_stride)
    if return_probs or kernel == "xla":
        return transposed_attention(qkv, **options, kernel=kernel, return_probs=return_probs)
    gpu = {}
    n_k, d = tokens // windows, channels // (3 * heads)
    if kernel == "auto" and gpu_attention.kernel_fits(qkv.dtype, windows, n_k, q_stride, d):
        # Mask units of power-of-two size: in place, no layout copies (gpu_attention).
        gpu["cuda"] = functools.partial(gpu_attention.window_attention, **options)
    elif kernel == "auto" and gpu_attention.global_fits(qkv.dtype, windows, n_k, q_stride, d):
        # One global window of up to 256 tokens: in place too, its length masked.
        gpu["cuda"] = functools.partial(
            gpu_attention.global_attention, heads=heads, scale=scale, q_stride=q_stride
        )
    elif kernel == "auto" and cudnn_fits(qkv.dtype, d):
        gpu["cuda"] = functools.partial(cudnn_attention, **options)
    if not token_kernel_fits(qkv, **options):
        if not gpu:
            return transposed_attention(qkv, **options, kernel=kernel)
        other = functools.partial(transposed_attention, **options, kernel=kernel)
        return lax.platform_dependent(qkv, **gpu, default=other)
    compiled = functools.partial(sharded_tokens, **options)
    if kernel == "pallas":
        other = functools.partial(compiled, interpret=True)
    else:
        other = functools.partial(transposed_attention, **options, kernel="xla")
    return lax.platform_dependent(
        qkv, tpu=functools.partial(compiled, interpret=False), **gpu, default=other
    )


def transposed_attention(
    qkv: jnp.ndarray,
    heads: int,
    windows: int,
    scale: float,
    q_stride: int = 1,
    kernel: str = "auto",
    return_probs: bool = False,
):
    """`attention` through [B, w, h, n, d] arrays: one transpose to [3, B, w, h, n, d] (every
    batch axis in front, so both attention matmuls and their gradients are plain batched GEMMs
    on XLA CPU), `window_attention` (or `xla_attention` with the probabilities), and back."""
    batch, tokens, channels = qkv.shape
    d = channels // (3 * heads)
    qkv = qkv.reshape(batch, -1, windows, 3, heads, d)
    q, k, v = qkv.transpose(3, 0, 2, 4, 1, 5)  # each [B, w, h, n, d]
    if q_stride > 1:  # max over the leading q_stride chunk of each window's tokens
        q = q.reshape(batch, windows, heads, q_stride, -1, d).max(axis=3)
    if return_probs:
        out, probs = xla_attention(q, k, v, scale, return_probs=True)
    else:
        out = window_attention(q, k, v, scale, kernel)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, -1, channels // 3)  # [B, n_q, w, h, d]
    return (out, probs) if return_probs else out
