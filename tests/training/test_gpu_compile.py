"""NVIDIA GPU programs compiled here, without a GPU: `train.py --aot h100:N` (the fit check), and
the GPU paths of the model (cuDNN's flash attention), checked against XLA's path in float32 on
the CPU and found in the GPU program. Needs the gpu extra (jax's CUDA plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import train as th

th.force_cpu_devices()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from hiera_jax.models import attention  # noqa: E402
from hiera_jax.models.kernels import gpu_attention  # noqa: E402
from hiera_jax.training.cost import aot, chips, hlo_cost  # noqa: E402

pytest.importorskip("jax_plugins.xla_cuda12", reason="the GPU compiler comes with the gpu extra")


def gpu_compile(fn, args) -> str:
    """The optimized HLO of `fn` compiled for one H100, no GPU involved."""
    device = SingleDeviceSharding(aot.topology_devices("h100:1")[0])
    shaped = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device) for a in args]
    return jax.jit(fn).trace(*shaped).lower().compile(aot.GPU_COMPILE_OPTIONS).as_text()


def assert_values_and_gradients_match(ours, reference, qkv):
    """`ours` against the model's own XLA path in float32: values, and the gradient of a random
    cotangent."""
    np.testing.assert_allclose(ours(qkv), reference(qkv), rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(1), reference(qkv).shape)
    g_ours = jax.vjp(ours, qkv)[1](cotangent)[0]
    g_ref = jax.vjp(reference, qkv)[1](cotangent)[0]
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


def grads(fn):
    def step(*args):
        loss = lambda *a: fn(*a).astype(jnp.float32).sum()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(*args)

    return step


def test_gpu_fit_check_reports_the_step_for_an_h100(tmp_path):
    command = [sys.executable, "train.py", "--config", "configs/digits_mae.py"]
    command += ["--workdir", str(tmp_path), "--aot", "h100:1", "--config.batch_size=64"]
    command += ["--config.model.dtype=bfloat16", "--config.model.scan_blocks=False"]
    env = {**os.environ, "XLA_FLAGS": th.xla_flags()}
    for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        env.pop(name, None)  # JAX's defaults (a benchmark module sets one when imported)
    run = subprocess.run(command, cwd=th.REPO, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout.strip().splitlines()
    assert out[-1].startswith("FITS: digits_mae on h100:1"), out
    assert os.listdir(tmp_path) == ["aot_h100:1.json"]
    report = json.load(open(tmp_path / "aot_h100:1.json"))
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["devices"] == 1
    assert report["fits"] is True and report["usable_hbm_fraction"] == 0.75
    h100 = chips.gpu_chips()["h100"]
    assert report["hbm_per_device_bytes"] == h100.hbm_bytes
    assert report["headroom_bytes"] == 0.75 * h100.hbm_bytes - report["memory"]["peak"]
    assert report["memory"]["temporaries"] > 0 and report["memory"]["arguments"] > 0
    assert report["compiler_options"] == {"xla_gpu_enable_triton_gemm": False}
    # XLA's GPU compiler has no cost analysis: the bytes are hlo_cost's count of its program,
    # the FLOPs the model's and what the kernels' backwards compute again, and the roofline the
    # H100's figures.
    assert "hlo_cost" in report["bytes_source"]
    fl, roof = report["flops"], report["roofline"]
    assert fl["bytes_accessed_per_device"] > 0 and fl["model_per_step"] > 0
    assert roof["peak_bf16_flops_per_device"] == 989e12
    assert roof["hbm_bandwidth_per_device"] == 3350e9
    assert roof["memory_seconds"] == pytest.approx(fl["bytes_accessed_per_device"] / 3350e9)
    executed = fl["model_per_step"] + fl["kernel_recompute_per_step"]
    assert roof["compute_seconds"] == pytest.approx(executed / 989e12)
    assert 0 < roof["mfu_ceiling"] <= 1
    assert report["collectives"] == {}


def test_gpu_step_over_several_hosts_that_does_not_fit_jax_pool_is_refused(monkeypatch):
    """Two hosts of two H100s, against a pool of 0.001% of each GPU (0.8 MiB): the verdict is the compiler's
    peak against JAX's pool (XLA_PYTHON_CLIENT_MEM_FRACTION), with the advice that raises it."""
    config = th.make_config(
        "mae", {"batch_size": 8, "model.dtype": "bfloat16", "model.scan_blocks": False}
    )
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.00001")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    with pytest.raises(aot.DoesNotFit) as e:
        aot.fit_check(config, "h100:2x2", config_name="digits_mae")
    report = e.value.report
    assert report["devices"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1}
    assert report["fits"] is False and report["usable_hbm_fraction"] == 0.00001
    memory = report["memory"]
    assert memory["available"] == 0.00001 * report["hbm_per_device_bytes"] < memory["needed"]
    assert memory["needed"] == memory["peak"] > 0
    assert "per GPU, JAX's pool on a NVIDIA H100 80GB HBM3 is 0.00 GiB" in e.value.reason
    assert e.value.advice[0].startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=.95")


@pytest.mark.parametrize(
    "topology, slices, message",
    [
        ("h100:0", 1, "must be >= 1"),
        ("h100:8", 2, "give GPU hosts in the name: h100:2x8"),
        ("h900:8", 1, "is not a topology name"),
    ],
)
def test_bad_gpu_targets_are_one_clear_error(topology, slices, message):
    with pytest.raises(ValueError, match=message):
        aot.topology_devices(topology, slices)


@pytest.mark.parametrize("name", sorted(chips.gpu_chips()))
def test_every_gpu_target_gives_devices_of_its_kind(name):
    devices = aot.topology_devices(f"{name}:2")
    assert len(devices) == 2
    assert chips.chip_for(devices[0].device_kind).name == name


@pytest.mark.parametrize(
    "heads, windows, q_stride, n",
    [(1, 49, 1, 64), (2, 49, 4, 64), (4, 1, 1, 196), (8, 1, 4, 196), (8, 1, 1, 49), (2, 3, 1, 49)],
)
def test_cudnn_layout_matches_xla_path_in_float32_values_and_gradients(heads, windows, q_stride, n):
    """The cuDNN branch's layout ([B·windows, n, heads, d], the query pooling before it, odd
    lengths padded by a masked row) run with jax's XLA implementation of the same call, against
    the model's own path."""
    d = 32
    qkv = jax.random.normal(jax.random.key(0), (2, n * windows, 3 * heads * d))
    options = dict(heads=heads, windows=windows, scale=d**-0.5, q_stride=q_stride)

    def ours(x):
        return attention.cudnn_attention(x, **options, implementation="xla")

    def reference(x):
        return attention.transposed_attention(x, **options, kernel="xla")

    assert_values_and_gradients_match(ours, reference, qkv)


@pytest.mark.parametrize(
    "tokens, windows, q_stride, target",
    [
        (64, 1, 1, "hiera_global_attention"),  # one global window of up to 256: in place
        (196, 1, 4, "hiera_global_attention"),  # pooled to 49 queries, 196 keys masked to 256
        (320, 1, 1, "__cudnn$fmhaSoftmax"),  # more keys than the global kernels hold: cuDNN
        (64 * 49, 49, 32, "__cudnn$fmhaSoftmax"),  # pooled to 2 queries: too few for Triton
        (64 * 49, 49, 4, "hiera_window_attention"),  # mask units of 64 keys, 16 queries
        (64 * 49, 49, 1, "hiera_window_attention"),
    ],
)
def test_gpu_programs_take_the_gpu_attention_kernels_and_cpu_programs_do_not(
    tokens, windows, q_stride, target
):
    x = jax.ShapeDtypeStruct((2, tokens, 96), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((96, 3 * 96), jnp.bfloat16)
    step = grads(lambda x, w: attention.attention(x @ w, 1, windows, 0.1, q_stride=q_stride))
    gpu = gpu_compile(step, [x, weight])
    if target.startswith("__cudnn"):
        assert gpu.count(f'custom_call_target="{target}"') == 1  # forward
        assert gpu.count(f'custom_call_target="{target}Backward"') == 1
        assert "hiera_window_attention" not in gpu and "hiera_global_attention" not in gpu
    else:
        assert 'custom_call_target="__cudnn$fmha' not in gpu
        assert gpu.count('custom_call_target="__gpu$xla.gpu.triton"') == 2
        assert f"{target}_fwd" in gpu and f"{target}_bwd" in gpu
        # Read and written in place: no copy or transpose of qkv, its gradient or the output.
        layout = [a for a in hlo_cost.accesses(gpu) if "attention" in a.op_name]
        assert not [a for a in layout if a.opcode in ("copy", "transpose")], layout
    cpu = jax.jit(step).lower(x, weight).compile().as_text()
    assert "custom_call" not in cpu
    # float32 keeps XLA's path (the official arithmetic).
    as_f32 = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, weight)]
    f32 = gpu_compile(step, as_f32)
    assert 'custom_call_target="__cudnn$fmha' not in f32 and "__gpu$xla.gpu.triton" not in f32


def test_global_kernels_move_fewer_bytes_than_cudnn_with_its_copies():
    """A stage-3 layer of the base model (196 tokens, 4 heads of 96), projection, attention and
    their gradients: cuDNN's path copies q, k, v out of the projection and their gradients
    back; the global kernels read and write the projection's layout."""
    x = jax.ShapeDtypeStruct((8, 196, 384), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((384, 3 * 384), jnp.bfloat16)

    def layer(fn):
        return grads(lambda x, w: fn(x @ w, heads=4, windows=1, scale=0.1, q_stride=1))

    ours = hlo_cost.bytes_accessed(gpu_compile(layer(attention.attention), [x, weight]))
    cudnn = hlo_cost.bytes_accessed(gpu_compile(layer(attention.cudnn_attention), [x, weight]))
    tokens = 8 * 196 * 384 * 2  # one [B, N, C] bf16 array
    assert cudnn - ours > 10 * tokens, (cudnn - ours) / tokens


@pytest.mark.parametrize(
    "heads, windows, q_stride, n, d", [(1, 4, 1, 64, 96), (2, 4, 4, 64, 32), (2, 3, 1, 16, 48)]
)
def test_in_place_kernels_match_xla_path_in_float32_values_and_gradients(
    heads, windows, q_stride, n, d
):
    """The Triton kernels in Pallas' interpreter: head dims in chunks (96 = 3 x 32, 48 = 3 x 16),
    a pooled window (16 queries of 64 keys), and ties in the pooling's gradient below."""
    qkv = jax.random.normal(jax.random.key(0), (2, n * windows, 3 * heads * d))
    options = dict(heads=heads, windows=windows, scale=d**-0.5, q_stride=q_stride)

    def ours(x):
        return gpu_attention.window_attention(x, *options.values(), True)

    def reference(x):
        return attention.transposed_attention(x, **options, kernel="xla")

    assert_values_and_gradients_match(ours, reference, qkv)


@pytest.mark.parametrize(
    "heads, n, q_stride, d", [(2, 76, 1, 32), (1, 196, 4, 96), (2, 49, 1, 48), (1, 16, 1, 16)]
)
def test_global_kernels_match_xla_path_in_float32_values_and_gradients(heads, n, q_stride, d):
    """One global window: 76 keys (the MAE encoder's last stages) masked to 128, 196 keys
    pooled to 49 queries (a stage change), 49 (Hiera's last stage), a power of two."""
    qkv = jax.random.normal(jax.random.key(0), (2, n, 3 * heads * d))
    options = dict(heads=heads, windows=1, scale=d**-0.5, q_stride=q_stride)

    def ours(x):
        return gpu_attention.global_attention(x, heads, d**-0.5, q_stride, True)

    def reference(x):
        return attention.transposed_attention(x, **options, kernel="xla")

    assert_values_and_gradients_match(ours, reference, qkv)


@pytest.mark.parametrize("windows", [2, 1])
def test_in_place_kernels_split_the_pooling_gradient_between_ties_as_jax_does(windows):
    """Queries rounded to a coarse grid tie often inside a pooled chunk: jax's max gives each
    tied candidate an equal share, and so must the kernels (mask units, one global window)."""
    heads, n, d = 1, 64 if windows > 1 else 196, 16
    qkv = jnp.round(jax.random.normal(jax.random.key(2), (1, n * windows, 3 * d)))
    options = dict(heads=heads, windows=windows, scale=d**-0.5, q_stride=4)

    def kernel(x):
        if windows > 1:
            return gpu_attention.window_attention(x, *options.values(), True)
        return gpu_attention.global_attention(x, 1, d**-0.5, 4, True)

    ours = jax.grad(lambda x: kernel(x).sum())(qkv)
    want = jax.grad(lambda x: attention.transposed_attention(x, **options, kernel="xla").sum())(qkv)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)


def test_in_place_kernels_in_bfloat16_are_as_close_to_float32_as_xla_in_bfloat16():
    qkv = jax.random.normal(jax.random.key(3), (2, 64 * 4, 3 * 2 * 32))
    options = dict(heads=2, windows=4, scale=32**-0.5, q_stride=4)
    want = attention.transposed_attention(qkv, **options, kernel="xla")
    low = qkv.astype(jnp.bfloat16)
    ours = gpu_attention.window_attention(low, *options.values(), True)
    xla = attention.transposed_attention(low, **options, kernel="xla")
    err = {k: float(jnp.abs(v.astype(jnp.float32) - want).max()) for k, v in
           {"ours": ours, "xla": xla}.items()}  # fmt: skip
    assert err["ours"] <= 1.25 * err["xla"] + 1e-3, err
    # One global window of 196 keys pooled to 49 queries.
    qkv = jax.random.normal(jax.random.key(4), (2, 196, 3 * 2 * 32))
    options = dict(heads=2, windows=1, scale=32**-0.5, q_stride=4)
    want = attention.transposed_attention(qkv, **options, kernel="xla")
    low = qkv.astype(jnp.bfloat16)
    ours = gpu_attention.global_attention(low, 2, 32**-0.5, 4, True)
    xla = attention.transposed_attention(low, **options, kernel="xla")
    err = {k: float(jnp.abs(v.astype(jnp.float32) - want).max()) for k, v in
           {"ours": ours, "xla": xla}.items()}  # fmt: skip
    assert err["ours"] <= 1.25 * err["xla"] + 1e-3, err


def test_flop_counts_see_through_the_gpu_kernels():
    """Model FLOPs stay XLA's ops' count; what the GPU branches compute again (cuDNN's logits
    in the backward, fc1 in the MLP kernel's backward) is counted as recompute, worked out
    from the shapes."""
    from hiera_jax.models.kernels import fused_mlp
    from hiera_jax.training.cost import flops

    b, h, d = 2, 2, 32
    # Mask units (q kᵀ again in the backward), one global window (q kᵀ and do vᵀ twice in the
    # backward, and q kᵀ for dq), more keys than the global kernels hold (cuDNN: q kᵀ again).
    for w, n, again in ((4, 64, 1), (1, 64, 3), (1, 320, 1)):
        qkv = jax.ShapeDtypeStruct((b, n * w, 3 * h * d), jnp.bfloat16)

        def step(x, w=w):
            loss = lambda x: attention.attention(x, h, w, 0.1).astype(jnp.float32).sum()  # noqa: E731
            return jax.value_and_grad(loss)(x)

        pairs = b * w * n * h * n * d  # [n, n] products of length d, per window and head
        assert flops.jaxpr_flops(step, qkv) == 2 * pairs * (2 + 4)  # forward 2, backward 4
        assert flops.kernel_recompute_flops(step, qkv, platform="cuda") == 2 * pairs * again
    rows, c = 8 * 196, 96
    x = jax.ShapeDtypeStruct((8, 196, c), jnp.bfloat16)
    p = fused_mlp.MlpHalf(
        *(jax.ShapeDtypeStruct(s, t) for s, t in [((c,), jnp.float32)] * 2),
        *(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [(c, 4 * c), (4 * c,), (4 * c, c), (c,)]),
    )

    def mlp(x, p):
        return fused_mlp.mlp_half(x, p, 1e-6).astype(jnp.float32).sum()

    grads = jax.grad(mlp, argnums=(0, 1))
    fc1 = 2 * rows * c * 4 * c
    assert flops.jaxpr_flops(grads, x, p) == 6 * fc1  # fc1, fc2 and four backward GEMMs
    # fc1 in both backward kernels, and dy w2ᵀ in the weight-gradient kernel too.
    assert flops.kernel_recompute_flops(grads, x, p, platform="cuda") == 3 * fc1


def test_odd_lengths_take_cudnn_padded_by_one_masked_row():
    """jax 0.10.2 trains cuDNN's attention on even lengths only: a global window longer than
    the global kernels take (17 x 17 tokens, or as many queries pooled from 4 x as many keys)."""
    weight = jax.ShapeDtypeStruct((96, 3 * 96), jnp.bfloat16)
    for tokens, q_stride in ((289, 1), (1156, 4)):
        x = jax.ShapeDtypeStruct((2, tokens, 96), jnp.bfloat16)
        step = grads(lambda x, w, s=q_stride: attention.attention(x @ w, 1, 1, 0.1, q_stride=s))
        gpu = gpu_compile(step, [x, weight])
        calls = [ln for ln in gpu.splitlines() if 'custom_call_target="__cudnn$fmha' in ln]
        assert len(calls) == 2 and all("bf16[2,290,1,96]" in ln for ln in calls), calls
