"""The Pallas attention kernel (hiera_jax.models.attention) against XLA's path and a float64 one.

Off TPU the kernel runs in Pallas' interpreter (the same kernel code, `kernel="pallas"`); TPU
programs are compiled here ahead of time (libtpu on this CPU), so the platform's pick, the
sharding and the bytes are checked on the real TPU compiler's output.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train as th
from helpers.reference import rel_err
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import hiera_jax
from hiera_jax.models import attention
from hiera_jax.training.cost import aot, flops, hlo_cost

# [B, w, h, n_q, d] and n_k of Hiera's attention kinds: a stage-1 mask unit, a pooled-query
# transition (n_q = n_k / 4), a global stage with several heads, an odd window.
SHAPES = [
    ((2, 3, 1, 64, 96), 64),
    ((2, 3, 2, 16, 32), 64),
    ((1, 1, 4, 49, 24), 49),
    ((3, 2, 1, 9, 8), 36),
]


def _inputs(shape, n_k, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    kv_shape = (*shape[:3], n_k, shape[4])
    q = jax.random.normal(keys[0], shape) * 2
    k, v = (jax.random.normal(key, kv_shape) for key in keys[1:3])
    dout = jax.random.normal(keys[3], shape)
    return [a.astype(dtype) for a in (q, k, v)], dout


def _float64_attention(q, k, v, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bwhqd,bwhkd->bwhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bwhqk,bwhkd->bwhqd", p / p.sum(-1, keepdims=True), v)


def _value_and_grads(fn, qkv, dout):
    out, vjp = jax.vjp(fn, *qkv)
    return out, vjp(dout.astype(out.dtype))


@pytest.mark.parametrize("shape,n_k", SHAPES)
def test_kernel_matches_xla_in_float32_values_and_gradients(shape, n_k):
    qkv, dout = _inputs(shape, n_k, jnp.float32)
    scale = shape[-1] ** -0.5
    kernel = _value_and_grads(
        lambda q, k, v: attention.window_attention(q, k, v, scale, "pallas"), qkv, dout
    )
    xla = _value_and_grads(lambda q, k, v: attention.xla_attention(q, k, v, scale), qkv, dout)
    assert rel_err(kernel[0], xla[0]) < 1e-5
    for got, want in zip(kernel[1], xla[1]):
        assert got.shape == want.shape and rel_err(got, want) < 1e-5
    assert rel_err(kernel[0], _float64_attention(*qkv, scale)) < 1e-5


@pytest.mark.parametrize("shape,n_k", SHAPES[:2])
def test_kernel_in_bfloat16_is_as_close_to_float64_as_xla_in_bfloat16(shape, n_k):
    qkv, _ = _inputs(shape, n_k, jnp.bfloat16, seed=1)
    scale = shape[-1] ** -0.5
    exact = _float64_attention(*qkv, scale)
    kernel = attention.window_attention(*qkv, scale, "pallas")
    xla = attention.xla_attention(*qkv, scale)
    assert kernel.dtype == jnp.bfloat16
    # The kernel keeps the logits in f32 and scales them there: no worse than XLA's bf16 path.
    assert rel_err(kernel, exact) <= 1.5 * rel_err(xla, exact) + 1e-3


# qkv projections [B, N, 3·C] of (batch, tokens, width, heads, windows, q_stride): global
# attention, mask units of one and of several heads, a head dim above one 128-lane tile, and
# query pooling (stage transitions) with and without windows.
TOKEN_SHAPES = [
    (2, 64, 32, 2, 1, 1),
    (2, 48, 24, 1, 4, 1),
    (1, 36, 48, 4, 9, 1),
    (1, 16, 272, 2, 2, 1),
    (2, 64, 32, 2, 1, 4),
    (2, 64, 24, 1, 4, 4),
    (1, 72, 48, 2, 2, 4),
]


@pytest.mark.parametrize("batch,tokens,width,heads,windows,q_stride", TOKEN_SHAPES)
def test_token_kernel_matches_xla_in_float32_values_and_gradients(
    batch, tokens, width, heads, windows, q_stride
):
    keys = jax.random.split(jax.random.key(2), 2)
    qkv = jax.random.normal(keys[0], (batch, tokens, 3 * width))
    dout = jax.random.normal(keys[1], (batch, tokens // q_stride, width))
    scale = (width // heads) ** -0.5
    fn = functools.partial(
        attention.attention, heads=heads, windows=windows, scale=scale, q_stride=q_stride
    )

    def run(kernel):
        out, vjp = jax.vjp(lambda x: fn(x, kernel=kernel), qkv)
        return out, vjp(dout)[0]

    kernel, xla = run("pallas"), run("xla")
    assert kernel[0].shape == (batch, tokens // q_stride, width)
    assert rel_err(kernel[0], xla[0]) < 1e-5 and rel_err(kernel[1], xla[1]) < 1e-5
    # Independently, in float64: window w holds every `windows`-th token from the w-th; its
    # queries are max-pooled over the window's q_stride leading chunks.
    q, k, v = (
        np.asarray(qkv, np.float64).reshape(batch, tokens, 3, heads, -1).transpose(2, 0, 3, 1, 4)
    )
    out = np.asarray(kernel[0]).reshape(batch, -1, heads, width // heads)
    for w in range(windows):
        rows = np.arange(w, tokens, windows)  # [n_k]
        pooled = q[:, :, rows].reshape(batch, heads, q_stride, -1, width // heads).max(2)
        exact = _float64_attention(pooled[:, None], k[:, None, :, rows], v[:, None, :, rows], scale)
        got = out[:, w::windows].transpose(0, 2, 1, 3)  # [B, h, n_q, d]
        assert rel_err(got, exact[:, 0]) < 1e-5


def test_kernels_size_themselves_to_the_chip_compiled_for():
    # Stage 2's first block of Hiera-B at 224 (16 images, 49 windows of 64 tokens, pooled 4x):
    # its qkv, gradients and f32 head slots need ~37 MB of VMEM, which a v5e core has (128 MiB)
    # and a v4 core (16 MiB) does not; there the window kernel runs.
    assert attention.vmem_capacity() == 16 * 2**20  # no TPU in sight: the smallest
    x = jax.ShapeDtypeStruct((4, 3136, 96), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((96, 3 * 192), jnp.bfloat16)
    step = _grads(lambda x, w: attention.attention(x @ w, 2, 49, 0.1, q_stride=4))
    programs = {}
    for topology in ("v5e:2x2", "v4:2x2x1"):
        device = aot.topology_devices(topology)[0]
        with attention.compiling_for(device.device_kind):
            capacity = attention.vmem_capacity()
        assert capacity == {"v5e:2x2": 128, "v4:2x2x1": 16}[topology] * 2**20
        sharding = (SingleDeviceSharding(device),) * 2
        programs[topology] = th.tpu_compile(step, [x, weight], sharding, device.device_kind)
    for topology, hlo in programs.items():
        assert hlo.count("tpu_custom_call") == 2, topology
    # The token kernel takes the projection's [B, N, 3·C]; the window kernel [B·w·h, n, d].
    assert "bf16[4,3136,576]" in _custom_call_operands(programs["v5e:2x2"])
    assert "bf16[4,3136,576]" not in _custom_call_operands(programs["v4:2x2x1"])


def _custom_call_operands(hlo: str) -> str:
    return "\n".join(
        line.split("custom-call(")[1] for line in hlo.splitlines() if "tpu_custom_call" in line
    )


@pytest.mark.parametrize("name", ["hiera_tiny_224", "mae_hiera_tiny_224"])
def test_model_with_the_kernel_matches_the_model_without_it(name):
    """Loss and every parameter's gradient, float32, kernel (interpreted) against XLA's ops:
    the classifier, and the MAE (masked windows, the decoder's global attention)."""
    outs = {}
    for kernel in ("xla", "pallas"):
        # Stage 3's last two blocks run as one scan (the CPU default), the kernel inside its
        # checkpointed body; the other stages have one block each.
        model = hiera_jax.create_model(
            name, input_size=(64, 64), stages=(1, 1, 3, 1), attention_kernel=kernel
        )
        params = hiera_jax.init_params(model, jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))

        def loss(p, model=model, x=x):
            if name.startswith("mae_"):
                return model.apply({"params": p}, x, rngs={"mask": jax.random.key(2)})[0]
            return jnp.sum(model.apply({"params": p}, x) ** 2)

        outs[kernel] = jax.jit(jax.value_and_grad(loss))(params)
    assert rel_err(outs["pallas"][0], outs["xla"][0]) < 1e-5
    for got, want in zip(jax.tree.leaves(outs["pallas"][1]), jax.tree.leaves(outs["xla"][1])):
        assert rel_err(got, want) < 1e-4


def test_bad_kernel_names_and_shapes_raise():
    qkv, _ = _inputs(*SHAPES[0], jnp.float32)
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        attention.window_attention(*qkv, 1.0, "flash")
    with pytest.raises(ValueError, match="not .B, w, h, n, d. windows"):
        attention.window_attention(qkv[0], qkv[1][..., :8], qkv[2], 1.0)
    with pytest.raises(ValueError, match="attention_kernel must be"):
        hiera_jax.HieraConfig(attention_kernel="cudnn")


def _grads(fn):
    def step(*args):
        def loss(*a):
            return (fn(*a).astype(jnp.float32) ** 2).sum()

        return jax.grad(loss, argnums=tuple(range(len(args))))(*args)

    return step


@pytest.mark.parametrize("windows", [1, 49])
def test_tpu_programs_take_the_kernel_and_cpu_programs_do_not(windows):
    """Forward + backward of attention from a qkv projection (a stage-1 mask unit, a global
    stage), compiled for a TPU and for the CPU."""
    x = jax.ShapeDtypeStruct((2, 64 * windows, 96), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((96, 3 * 96), jnp.bfloat16)
    step = _grads(lambda x, w: attention.attention(x @ w, 1, windows, 0.1))
    device = SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])
    tpu = th.tpu_compile(step, [x, weight], (device,) * 2)
    assert tpu.count('custom_call_target="tpu_custom_call"') == 2  # forward and backward
    # Straight from the projection's layout: no relayout of qkv or of the output around it.
    assert [a.opcode for a in hlo_cost.accesses(tpu) if a.opcode in ("copy", "transpose")] == []
    cpu = jax.jit(step).lower(x, weight).compile().as_text()
    assert "custom_call" not in cpu


def test_windows_too_large_for_vmem_take_the_flash_kernel_on_tpu():
    """SAM 2's global blocks (4096 tokens at 1024) and the like: JAX's flash kernel where a tile
    divides the lengths, so no [n_q, n_k] logits reach HBM; XLA's path where none does."""
    assert not attention.kernel_fits(1024, 1024)
    assert attention.flash_block(1024, 1024) == 512 and attention.flash_block(1000, 1000) is None
    device = SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])
    step = _grads(lambda q, k, v: attention.window_attention(q, k, v, 0.1))
    big = [jax.ShapeDtypeStruct((1, 1, 2, 1024, 64), jnp.bfloat16)] * 3
    hlo = th.tpu_compile(step, big, (device,) * 3)
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 3  # forward, dq, dk/dv
    assert "1024,1024]" not in hlo  # no logits or probabilities in HBM
    odd = [jax.ShapeDtypeStruct((1, 1, 2, 1000, 64), jnp.bfloat16)] * 3
    assert "tpu_custom_call" not in th.tpu_compile(step, odd, (device,) * 3)
    cpu = jax.jit(step).lower(*big).compile().as_text()
    assert "custom_call" not in cpu  # the CPU (and GPU) take XLA's path


@pytest.fixture
def tpu_interpreter():
    """Pallas TPU kernels run in the TPU interpreter on this CPU, for the test's duration."""
    from jax.experimental.pallas import tpu as pltpu

    pltpu.set_tpu_interpret_mode()
    try:
        yield
    finally:
        pltpu.set_tpu_interpret_mode(None)


def test_flash_kernel_matches_xla_in_float32_values_and_gradients(tpu_interpreter):
    """`flash_window_attention` (the TPU program's pick above) in the TPU interpreter: a pooled
    query (n_q = n_k / 4, as HieraDet's pooling blocks) and a square global window."""
    for shape, n_k in (((1, 2, 2, 128, 32), 512), ((2, 1, 1, 256, 96), 256)):
        (q, k, v), dout = _inputs(shape, n_k, jnp.float32, seed=n_k)
        flash = functools.partial(attention.flash_window_attention, scale=0.2, block=128)
        xla = functools.partial(attention.xla_attention, scale=0.2)
        out, pullback = jax.vjp(flash, q, k, v)
        ref, ref_pullback = jax.vjp(xla, q, k, v)
        assert rel_err(out, ref) < 1e-5
        for ours, theirs in zip(pullback(dout), ref_pullback(dout), strict=True):
            assert rel_err(ours, theirs) < 1e-5


def test_kernel_moves_fewer_bytes_than_xla_on_tpu():
    """A stage-3 attention of Hiera-B (4 heads, 196 tokens) from its qkv projection, forward
    + backward, on one chip: the kernel reads and writes [N, 3·C] and [N, C] arrays only."""
    x = jax.ShapeDtypeStruct((8, 196, 384), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((384, 3 * 384), jnp.bfloat16)
    device = SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])
    bytes_of = {}
    for kernel in ("xla", "auto"):
        step = _grads(
            lambda x, w, kernel=kernel: attention.attention(x @ w, 4, 1, 0.1, kernel=kernel)
        )
        bytes_of[kernel] = hlo_cost.bytes_accessed(th.tpu_compile(step, [x, weight], (device,) * 2))
    assert bytes_of["auto"] < 0.4 * bytes_of["xla"], bytes_of


@pytest.mark.parametrize("entry", ["window", "tokens"])
def test_the_kernel_runs_per_device_under_a_mesh(entry):
    """XLA cannot split a custom call: under a mesh the kernel must get each device's share of
    the batch (shard_map), not an all-gathered batch."""
    devices = np.array(aot.topology_devices("v5e:2x2")).reshape(2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp"))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    if entry == "window":
        args = [jax.ShapeDtypeStruct((8, 1, 4, 49, 96), jnp.bfloat16)] * 3
        per_device = "bf16[8,49,96]"  # 2 images x 4 heads

        def forward(q, k, v):
            return attention.window_attention(q, k, v, 0.1)
    else:
        args = [jax.ShapeDtypeStruct((8, 49, 3 * 384), jnp.bfloat16)]
        per_device = "bf16[2,49,384]"  # 2 images' outputs

        def forward(qkv):
            return attention.attention(qkv, 4, 1, 0.1)

    with jax.set_mesh(mesh):
        hlo = th.tpu_compile(forward, args, (batch,) * len(args), out_shardings=batch)
    call = next(line for line in hlo.splitlines() if "tpu_custom_call" in line)
    assert per_device in call.split("custom-call(")[0]
    assert "all-gather" not in hlo


def test_jaxpr_flop_count_sees_model_flops_through_the_platform_switch():
    """The backend-free FLOP count (a GPU's fallback) reads the kernels' cost estimates and, of
    a platform switch's branches, the least: the kernel's backward recomputes q kᵀ."""
    qkv = jax.ShapeDtypeStruct((2, 4 * 64, 3 * 96), jnp.float32)

    def step(kernel):
        def grad(x):
            return jax.grad(
                lambda x: (attention.attention(x, 2, 4, 0.1, kernel=kernel) ** 2).sum()
            )(x)

        return grad

    assert flops.jaxpr_flops(step("auto"), qkv) == flops.jaxpr_flops(step("xla"), qkv)
    # Alone, the kernel's estimate: 2 matmuls forward, 5 backward, per window and head.
    n, d, heads, windows = 64, 48, 2, 4
    matmul = 2 * 2 * windows * heads * n * n * d
    assert flops.jaxpr_flops(step("pallas"), qkv) == 7 * matmul
