"""The dense layers' matmul (`hiera_jax.models.kernels.matmul`): `nn.Dense`'s values and gradients, any rank."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiera_jax.models.kernels import matmul
from hiera_jax.models.kernels.matmul import MATMUL_NAME, Dense


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


@pytest.mark.parametrize("path", ["_flat_matmul", "_plain_matmul"])
def test_each_platform_path_matches_a_plain_dot(path):
    """The CPU path (flattened, custom VJP) and the other platforms' (autodiff's dots) give the
    same values and gradients; tests on the CPU run only the first through `Dense`."""
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(2, 3, 7).astype(np.float32))
    w = jnp.asarray(rng.randn(7, 5).astype(np.float32))
    fn = getattr(matmul, path)

    def loss(f, x, w):
        return jnp.sum(jnp.sin(f(x, w)))

    ref = jnp.einsum("bnk,kd->bnd", x, w, precision="highest")
    np.testing.assert_allclose(fn(x, w), ref, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda x, w: loss(fn, x, w), argnums=(0, 1))(x, w)
    refs = jax.grad(
        lambda x, w: loss(lambda a, b: jnp.einsum("bnk,kd->bnd", a, b, precision="highest"), x, w),
        argnums=(0, 1),
    )(x, w)
    for g, r in zip(grads, refs, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert MATMUL_NAME in str(jax.make_jaxpr(fn)(x, w))  # remat policies see both


def test_the_lowering_platform_picks_the_path():
    """Compiled for a TPU (from this CPU host, as the fit check does), `Dense` is the program
    `nn.Dense` compiles to: the same bytes and FLOPs, no platform switch left. Compiled for the
    CPU it is the flattened GEMM with the custom VJP, which XLA CPU counts differently."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the tpu extra")
    from jax.sharding import SingleDeviceSharding

    from hiera_jax.training.cost import aot

    x = jnp.ones((4, 196, 96), jnp.bfloat16)
    sharding = SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])

    def compiled(module, **jit):
        params = module.init(jax.random.key(0), x)

        def step(params, x):
            return jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2))(params)

        return jax.jit(step, **jit).lower(params, x).compile()

    def cost(c):
        c = c.cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return c["bytes accessed"], c["flops"]

    tpu = compiled(Dense(192, dtype=jnp.bfloat16), in_shardings=(sharding, sharding))
    tpu_ref = compiled(nn.Dense(192, dtype=jnp.bfloat16), in_shardings=(sharding, sharding))
    assert " conditional(" not in tpu.as_text()
    assert cost(tpu) == cost(tpu_ref)
    cpu = compiled(Dense(192, dtype=jnp.bfloat16))
    flat = compiled(nn.Dense(192, dtype=jnp.bfloat16, dot_general=_flat_dot_general))
    assert " conditional(" not in cpu.as_text()
    assert cost(cpu) == cost(flat) and cost(cpu) != cost(
        compiled(nn.Dense(192, dtype=jnp.bfloat16))
    )


def _flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's dot as the CPU path computes it, without the platform switch."""
    return matmul._flat_matmul(lhs, rhs)
