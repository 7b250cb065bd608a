"""cuDNN's flash attention on NVIDIA GPUs, for windows the Triton kernels do not take."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# NVIDIA GPUs: cuDNN's fused flash attention (`jax.nn.dot_product_attention(...,
# implementation="cudnn")`), forward and backward, with the windows folded into the batch. Its
# softmax stays on chip, so no [n_q, n_k] logits or probabilities reach HBM (XLA's path writes
# them in f32 and reads them back in the backward: most of a GPU step's attention bytes). It
# takes 16-bit inputs and head dims that are multiples of 8 up to 128 (256 from Hopper on); f32
# programs keep XLA's path, the official arithmetic.
CUDNN_MAX_HEAD_DIM = 128  # what every GPU cuDNN's flash attention runs on takes


@functools.cache
def cudnn_present() -> bool:
    """Whether JAX can reach cuDNN (its CUDA plugin is installed): tracing the GPU branch asks
    cuDNN its version, so without the plugin the program gets no GPU branch (nor could it run on
    a GPU)."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:  # pragma: no cover - a jax without the module
        return False
    if cuda_versions is None:
        return False
    try:
        return cuda_versions.cudnn_get_version() >= 8900
    except Exception:  # noqa: BLE001 - a plugin without a loadable cuDNN
        return False


def cudnn_fits(dtype, head_dim: int) -> bool:
    """Whether cuDNN's flash attention takes these windows (`attention` on a GPU)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= CUDNN_MAX_HEAD_DIM
        and cudnn_present()
    )


def _pad_rows(a: jnp.ndarray, extra: int) -> jnp.ndarray:
    return jnp.pad(a, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else a


def cudnn_attention(
    qkv: jnp.ndarray,
    heads: int,
    windows: int,
    scale: float,
    q_stride: int = 1,
    implementation: str = "cudnn",
) -> jnp.ndarray:
    """`attention` through `jax.nn.dot_product_attention` on [B·windows, n, heads, d] arrays:
    one copy from the projection's layout into cuDNN's (the query pooling fused into it) and one
    back. `implementation="xla"` is the same arithmetic as XLA ops on any backend: the tests'
    float32 reference for the layout and the pooling."""
    batch, _, channels = qkv.shape
    d = channels // (3 * heads)
    parts = qkv.reshape(batch, -1, windows, 3, heads, d).transpose(3, 0, 2, 1, 4, 5)
    q, k, v = (a.reshape(batch * windows, -1, heads, d) for a in parts)  # [B·w, n, h, d]
    if q_stride > 1:  # max over the leading q_stride chunk of each window's tokens
        q = q.reshape(batch * windows, q_stride, -1, heads, d).max(axis=1)
    n_q, n_k = q.shape[1], k.shape[1]
    lengths = {}
    if n_q % 2 or n_k % 2:
        # jax 0.10.2 trains cuDNN's attention on even lengths only (it checks them as if a bias
        # were given): one zero row more, masked out by the lengths (the pad is part of the
        # layout copy; the extra query's output is dropped).
        q, k, v = (_pad_rows(a, a.shape[1] % 2) for a in (q, k, v))
        lengths = dict(
            query_seq_lengths=jnp.full((batch * windows,), n_q, jnp.int32),
            key_value_seq_lengths=jnp.full((batch * windows,), n_k, jnp.int32),
        )
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, implementation=implementation, **lengths
    )[:, :n_q]
    out = out.reshape(batch, windows, -1, heads * d).transpose(0, 2, 1, 3)  # [B, n_q, w, C]
    return out.reshape(batch, -1, heads * d)
