"""The dense layers' matmul (`hiera_jax.models.matmul`): `nn.Dense`'s values and gradients, any rank."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiera_jax.models.matmul import MATMUL_NAME, Dense


def _value_and_grads(module, x):
    params = module.init(jax.random.key(0), x)

    def loss(params, x):
        return jnp.sum(jnp.sin(module.apply(params, x).astype(jnp.float32)))

    return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (2, 3, 4, 7)])
def test_same_values_and_gradients_as_nn_dense(shape):
    x = jnp.asarray(np.random.RandomState(0).randn(*shape).astype(np.float32))
    ours, (g_params, g_x) = _value_and_grads(Dense(6), x)
    ref, (r_params, r_x) = _value_and_grads(nn.Dense(6), x)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_x, r_x, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_params), jax.tree.leaves(r_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_dtypes():
    x = jnp.ones((2, 3, 8), jnp.float32)
    out, (g_params, g_x) = _value_and_grads(Dense(4, dtype=jnp.bfloat16), x)
    assert out.dtype == jnp.bfloat16 and g_x.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_params))  # params stay f32


def test_options_it_does_not_handle_go_to_lax_dot_general():
    x = jnp.asarray(np.random.RandomState(1).randn(3, 4).astype(np.float32))
    module = Dense(5, precision=jax.lax.Precision.HIGHEST)
    params = module.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(module.apply)(params, x))
    assert "custom_vjp" not in jaxpr and "dot_general" in jaxpr
    np.testing.assert_allclose(
        module.apply(params, x), nn.Dense(5).apply(params, x), rtol=1e-6, atol=1e-6
    )


def test_output_is_named_for_remat_policies():
    x = jnp.ones((2, 4), jnp.float32)
    module = Dense(3)
    params = module.init(jax.random.key(0), x)
    assert MATMUL_NAME in str(jax.make_jaxpr(module.apply)(params, x))
