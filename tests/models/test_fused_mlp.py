"""The MLP-half kernel (hiera_jax.models.kernels.fused_mlp): x + drop(fc2(gelu(fc1(norm2(x))))).

Off TPU the kernel runs in Pallas' interpreter (`kernel="pallas"`, the same kernel code) and is
checked against torch's float64 autograd and XLA's path; TPU programs are compiled here ahead of
time (libtpu on this CPU), so the platform's pick, the sharding and the bytes are checked on the
real TPU compiler's output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import train as th
from helpers.reference import rel_err
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import hiera_jax
from hiera_jax.models.kernels import fused_mlp
from hiera_jax.training.cost import aot, flops, hlo_cost

EPS = 1e-6
# [B, N, C], H: a stage-1 tile of one image (N > ROWS: row tiles), several short images per
# step, an odd token count, a pooled stage.
SHAPES = [((2, 1024, 16), 64), ((6, 49, 32), 128), ((3, 9, 8), 24), ((4, 196, 24), 96)]


def _inputs(shape, hidden, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 9)
    dim = shape[-1]
    x = jax.random.normal(keys[0], shape)
    p = fused_mlp.MlpHalf(
        1.0 + 0.1 * jax.random.normal(keys[1], (dim,)),
        0.1 * jax.random.normal(keys[2], (dim,)),
        jax.random.normal(keys[3], (dim, hidden)) / dim**0.5,
        0.1 * jax.random.normal(keys[4], (hidden,)),
        jax.random.normal(keys[5], (hidden, dim)) / hidden**0.5,
        0.1 * jax.random.normal(keys[6], (dim,)),
    )
    keep = jax.random.bernoulli(keys[7], 0.7, (shape[0], 1, 1))
    dout = jax.random.normal(keys[8], shape)
    p = fused_mlp.MlpHalf(*p[:2], *(a.astype(dtype) for a in p[2:]))
    return x.astype(dtype), p, keep, dout


def _torch_float64(x, p, keep, keep_scale, dout):
    """Output and gradients (x, then the parameters) by torch's float64 autograd."""
    t = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, *p)]
    tx, scale, bias, w1, b1, w2, b2 = t
    normed = torch.nn.functional.layer_norm(tx, (tx.shape[-1],), scale, bias, EPS)
    y = torch.nn.functional.gelu(normed @ w1 + b1) @ w2 + b2
    factor = torch.tensor(np.asarray(keep, np.float64)) / keep_scale
    out = tx + factor * y
    out.backward(torch.tensor(np.asarray(dout, np.float64)))
    return out.detach().numpy(), [a.grad.numpy() for a in t]


def _value_and_grads(kernel, x, p, keep, keep_scale, dout):
    def f(x, p):
        return fused_mlp.mlp_half(x, p, EPS, keep, keep_scale, kernel=kernel)

    out, vjp = jax.vjp(f, x, p)
    dx, dp = vjp(dout.astype(out.dtype))
    return out, [dx, *dp]


@pytest.mark.parametrize("shape,hidden", SHAPES)
def test_kernel_matches_float64_and_xla_in_float32(shape, hidden):
    x, p, keep, dout = _inputs(shape, hidden)
    want, want_grads = _torch_float64(x, p, keep, 0.7, dout)
    for kernel in ("pallas", "xla"):
        out, grads = _value_and_grads(kernel, x, p, keep, 0.7, dout)
        assert rel_err(out, want) < 1e-5, kernel
        for got, expected in zip(grads, want_grads):
            assert rel_err(got, expected) < 1e-5, kernel


def test_kernel_without_drop_path_and_with_every_example_dropped():
    x, p, _, dout = _inputs((2, 64, 16), 64)
    for keep in (None, jnp.zeros((2, 1, 1), bool)):
        kernel = _value_and_grads("pallas", x, p, keep, 0.5, dout)
        xla = _value_and_grads("xla", x, p, keep, 0.5, dout)
        for got, want in zip([kernel[0], *kernel[1]], [xla[0], *xla[1]]):
            if np.abs(np.asarray(want)).max() == 0:
                np.testing.assert_array_equal(got, want)
            else:
                assert rel_err(got, want) < 1e-5
    dropped = _value_and_grads("pallas", x, p, jnp.zeros((2, 1, 1), bool), 0.5, dout)
    np.testing.assert_array_equal(dropped[0], x)  # the branch is gone, exactly
    assert all(np.abs(np.asarray(g)).max() == 0 for g in dropped[1][1:])  # no parameter gradient


def test_kernel_in_bfloat16_is_as_close_to_float64_as_xla_in_bfloat16():
    x, p, keep, dout = _inputs((4, 196, 32), 128, jnp.bfloat16)
    want, want_grads = _torch_float64(x, p, keep, 0.7, dout)
    errors = {}
    for kernel in ("pallas", "xla"):
        out, grads = _value_and_grads(kernel, x, p, keep, 0.7, dout)
        errors[kernel] = [rel_err(out, want)] + [rel_err(g, w) for g, w in zip(grads, want_grads)]
    for kernel_err, xla_err in zip(errors["pallas"], errors["xla"]):
        assert kernel_err <= 1.25 * xla_err + 1e-3, errors


@pytest.mark.parametrize("name", ["hiera_tiny_224", "mae_hiera_tiny_224"])
def test_model_with_the_kernel_matches_the_model_without_it_in_training(name):
    """Loss and every parameter's gradient, float32, drop path on, kernel (interpreted)
    against XLA's ops; stage 3's two last blocks run as a scan (the CPU default)."""
    outs = {}
    for kernel in ("xla", "pallas"):
        model = hiera_jax.create_model(
            name, input_size=(64, 64), stages=(1, 1, 3, 1), drop_path_rate=0.5, mlp_kernel=kernel
        )
        params = hiera_jax.init_params(model, jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
        rngs = {"mask": jax.random.key(2), "dropout": jax.random.key(3)}

        def loss(p, model=model, x=x, rngs=rngs):
            out = model.apply({"params": p}, x, train=True, rngs=rngs)
            return out[0] if name.startswith("mae_") else jnp.sum(out**2)

        outs[kernel] = jax.jit(jax.value_and_grad(loss))(params)
    assert rel_err(outs["pallas"][0], outs["xla"][0]) < 1e-5
    for got, want in zip(jax.tree.leaves(outs["pallas"][1]), jax.tree.leaves(outs["xla"][1])):
        assert rel_err(got, want) < 1e-4


def test_bad_kernel_names_and_shapes_raise():
    x, p, _, _ = _inputs((2, 9, 8), 24)
    with pytest.raises(ValueError, match="mlp_kernel must be"):
        fused_mlp.mlp_half(x, p, EPS, kernel="triton")
    with pytest.raises(ValueError, match="not an MLP half"):
        fused_mlp.mlp_half(x[..., :4], p, EPS)
    with pytest.raises(ValueError, match="mlp_kernel must be"):
        hiera_jax.HieraConfig(mlp_kernel="cudnn")


def _step(kernel="auto"):
    """Gradients of a loss over one MLP half, as a train step takes them."""

    def step(x, p):
        def loss(x, p):
            out = fused_mlp.mlp_half(x, p, EPS, kernel=kernel)
            return (out.astype(jnp.float32) ** 2).sum()

        return jax.grad(loss, argnums=(0, 1))(x, p)

    return step


def _abstract(shape, hidden, dtype=jnp.bfloat16):
    x, p, _, _ = _inputs(shape, hidden, dtype)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (x, p))


def test_tpu_programs_take_the_kernel_and_move_fewer_bytes_cpu_programs_do_not():
    """Hiera-B's stage 3 MLP half at 16 images per chip, forward + backward."""
    args = _abstract((16, 196, 384), 1536)
    device = SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])
    shardings = jax.tree.map(lambda _: device, args)
    programs = {k: th.tpu_compile(_step(k), args, shardings) for k in ("auto", "xla")}
    assert programs["auto"].count('custom_call_target="tpu_custom_call"') == 2
    assert "tpu_custom_call" not in programs["xla"]
    nbytes = {k: hlo_cost.bytes_accessed(hlo) for k, hlo in programs.items()}
    assert nbytes["auto"] < 0.6 * nbytes["xla"], nbytes
    assert "custom_call" not in jax.jit(_step()).lower(*args).compile().as_text()


@pytest.mark.parametrize(
    "shape,hidden,topology",
    [((8, 49, 768), 3072, "v5e:2x2"), ((16, 196, 768), 3072, "v4:2x2x1")],
)
def test_mlps_that_do_not_pay_or_fit_take_xla_on_tpu_too(shape, hidden, topology):
    """Hiera-B's stage 4 at 8 images per chip (fewer token rows than the width), and a stage
    too wide for a v4 core's 16 MiB of VMEM."""
    args = _abstract(shape, hidden)
    device = aot.topology_devices(topology)[0]
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(device), args)
    assert "tpu_custom_call" not in th.tpu_compile(_step(), args, shardings, device.device_kind)


def test_megacore_chips_keep_one_partial_sum_per_core():
    args = _abstract((16, 196, 96), 384)
    hlo = {}
    for topology in ("v5e:2x2", "v4:2x2x1"):
        device = aot.topology_devices(topology)[0]
        shardings = jax.tree.map(lambda _, device=device: SingleDeviceSharding(device), args)
        hlo[topology] = th.tpu_compile(_step(), args, shardings, device.device_kind)
    # The backward's dw1 partial sums: [cores, C, H] in f32.
    assert "f32[1,96,384]" in hlo["v5e:2x2"] and "f32[2,96,384]" not in hlo["v5e:2x2"]
    assert "f32[2,96,384]" in hlo["v4:2x2x1"]


def test_the_kernel_runs_per_device_under_a_mesh_and_sums_weight_gradients():
    devices = np.array(aot.topology_devices("v5e:2x2")).reshape(2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp"))
    x, p = _abstract((32, 196, 384), 1536)
    shardings = (
        NamedSharding(mesh, P(("data", "fsdp"))),
        jax.tree.map(lambda _: NamedSharding(mesh, P()), p),
    )
    with jax.set_mesh(mesh):
        hlo = th.tpu_compile(_step(), (x, p), shardings)
    calls = [line for line in hlo.splitlines() if "tpu_custom_call" in line]
    assert len(calls) == 2 and all("bf16[8,196,384]" in c.split("custom-call(")[0] for c in calls)
    assert "all-reduce" in hlo  # the per-device weight gradients, summed
    assert "all-gather" not in hlo


def test_jaxpr_flop_count_sees_model_flops_through_the_platform_switch():
    """The backend-free FLOP count reads the kernels' cost estimates and, of a platform
    switch's branches, the least: the kernel's backward recomputes fc1."""
    args = _abstract((4, 64, 16), 64, jnp.float32)
    auto, xla, pallas = (flops.jaxpr_flops(_step(k), *args) for k in ("auto", "xla", "pallas"))
    assert auto == xla
    matmul = 2 * 4 * 64 * 16 * 64  # one [B·N, C] x [C, H] product
    assert pallas == 7 * matmul  # forward 2, backward 5
