"""The dense layers' matmul, with a backward whose matmuls XLA CPU runs as plain GEMMs.

`nn.Dense` on [B, N, C] contracts C with the kernel; autodiff then forms the kernel gradient as a
contraction over two axes (B and N) and, on XLA CPU, copies a transposed activation or output
gradient ([C, B·N], tens of MB per layer) and runs the GEMM on Eigen instead of the faster
library path (profile in BENCHMARKS.md). Flattening to [B·N, C] first and writing both gradients as
single-axis contractions removes the copies. Same parameters, same math. Programs compiled for
a TPU do not take that path: there the flattening reshapes are relayouts that cost HBM traffic,
so they get the plain dot and autodiff's gradients (`dense_dot_general`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

MATMUL_NAME = "dense_matmul"


@jax.custom_vjp
def _matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())))


def _matmul_fwd(x, w):
    return _matmul(x, w), (x, w)


def _matmul_bwd(residuals, dy):
    x, w = residuals
    dx = lax.dot_general(dy, w, (((1,), (1,)), ((), ())))  # dy · wᵀ: [M, K]
    dw = lax.dot_general(x, dy, (((0,), (0,)), ((), ())))  # xᵀ · dy: [K, N]
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(
    lhs: jnp.ndarray,
    rhs: jnp.ndarray,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> jnp.ndarray:
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: [..., K] x [K, N] -> [..., N].

    Anything else (batch dims, a precision, an output type, other options) goes to
    `lax.dot_general` as given.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    simple = (
        tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and rhs.ndim == 2
        and not lhs_batch
        and not rhs_batch
        and precision is None
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype
        and not kwargs
    )
    if not simple:
        return lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision,
            preferred_element_type=preferred_element_type,
            **kwargs,
        )
    # On TPU the flattening reshapes to [B·N, C] and back are relayouts of the tiled
    # activations: a base finetune step moves 11% more HBM bytes with them (BENCHMARKS.md,
    # "Where the bytes go"), so a TPU program gets autodiff's dots. GPUs keep
    # the flattened path their BENCHMARKS figures were measured with. The platform is the one
    # the program is compiled for (a TPU compile from a CPU host takes the TPU branch): the
    # switch's index is a constant there and XLA drops the other branch.
    return lax.platform_dependent(lhs, rhs, tpu=_plain_matmul, default=_flat_matmul)


def _flat_matmul(lhs: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """[..., K] x [K, N] as one [M, K] x [K, N] GEMM with the custom VJP (CPU, GPU)."""
    lead = lhs.shape[:-1]
    # Named, so that remat policies keep it as they keep dots (`dots_saveable` does not see
    # through the custom VJP): see `SAVE_MATMULS`.
    out = checkpoint_name(_matmul(lhs.reshape(-1, lhs.shape[-1]), rhs), MATMUL_NAME)
    return out.reshape(*lead, rhs.shape[1])


def _plain_matmul(lhs: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """[..., K] x [K, N] as `nn.Dense` contracts it (TPU), named as the other path's output is."""
    out = lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())))
    return checkpoint_name(out, MATMUL_NAME)


# What a loop body's backward keeps when it is not fully rematerialised: every matmul output
# (the dense layers' by name, attention's as dots); the elementwise rest is recomputed.
SAVE_MATMULS = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable,
    jax.checkpoint_policies.save_only_these_names(MATMUL_NAME),
)

# `nn.Dense` with this matmul: the same module, parameters and names.
Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)
