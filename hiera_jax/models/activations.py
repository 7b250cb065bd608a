"""The MLP activations, by transformers' `hidden_act` names (`transformers.activations.ACT2FN`).

Hiera uses exact GELU; a Hugging Face config may name another activation, and these are the ones
transformers has that a block can compute the same way. Any other name is refused by `HieraConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact (erf) GELU, as torch.nn.GELU; Flax's default tanh form moves logits by ~3e-4.

    Written as torch writes it, `x / 2 * (1 + erf(x / sqrt(2)))`: `jax.nn.gelu(approximate=False)`
    goes through `erfc`, which XLA CPU lowers to exponentials and selects (~3x slower here).
    """
    return x * (0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype)))


def gelu_tanh(x: jnp.ndarray) -> jnp.ndarray:
    """The tanh approximation (transformers' gelu_new, gelu_fast, gelu_pytorch_tanh)."""
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}
