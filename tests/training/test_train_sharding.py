"""Sharded training equals single-device training; parameters really are split over `fsdp`."""

from __future__ import annotations

from helpers import train as th

th.force_cpu_devices()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hiera_jax.training import sharding  # noqa: E402
from hiera_jax.training.loop import train_and_evaluate  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < th.N_DEVICES, reason="needs 8 (simulated) devices set before jax import"
)


def test_fsdp_spec_rule():
    assert sharding.fsdp_spec((64, 192), 4) == P(None, "fsdp")  # the largest divisible dim
    assert sharding.fsdp_spec((192, 64), 4) == P("fsdp", None)
    assert sharding.fsdp_spec((6, 10), 4) == P()  # nothing divisible: replicate
    assert sharding.fsdp_spec((10, 12), 4) == P(None, "fsdp")
    assert sharding.fsdp_spec((64,), 4, min_size=128) == P()  # too small
    assert sharding.fsdp_spec((64, 192), 1) == P()
    assert sharding.fsdp_spec((), 8) == P()


def test_mesh_shape_errors():
    assert sharding.resolve_mesh_shape((-1, 2), 8) == (4, 2)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.resolve_mesh_shape((-1, 3), 8)
    with pytest.raises(ValueError, match="8 are used"):
        sharding.resolve_mesh_shape((2, 2), 8)


def _run(task, mesh_shape, workdir, devices=None, **extra):
    values = th.overrides(mesh_shape=mesh_shape, total_steps=4, **extra)
    config = th.make_config(task, values)
    return train_and_evaluate(
        config, str(workdir), devices=devices, return_params=True, return_state=True, progress=False
    )


def _compare(reference, other, label):
    ref_loss = np.array([h["loss"] for h in reference["history"]])
    loss = np.array([h["loss"] for h in other["history"]])
    assert len(loss) == len(ref_loss) == 4
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=0, err_msg=label)
    # Parameters follow the same trajectory. Adam normalises each update to about lr in size,
    # so where a gradient is ~0 (rounding noise) two runs may step differently: bound the
    # difference by a quarter of one step at the peak lr (2e-3) instead of relatively.
    for a, b in zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(other["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=5e-4, err_msg=label)


MESHES = [(8, 1), (2, 4), (1, 8)]


@pytest.fixture(scope="module")
def mae_runs(tmp_path_factory):
    """4 MAE steps on one device and on every mesh shape (shared by the tests below)."""
    root = tmp_path_factory.mktemp("mae_runs")
    runs = {(1, 1): _run("mae", (1, 1), root / "single", devices=jax.devices()[:1])}
    for shape in MESHES:
        runs[shape] = _run("mae", shape, root / f"mesh{shape[0]}x{shape[1]}")
    return runs


def test_mae_sharded_losses_match_single_device(mae_runs):
    single = mae_runs[(1, 1)]
    assert single["mesh"].size == 1
    first = np.array([h["loss"] for h in single["history"]])
    assert np.all(np.isfinite(first)) and first[-1] != first[0]  # it really trained
    for shape in MESHES:
        run = mae_runs[shape]
        assert dict(run["mesh"].shape) == {"data": shape[0], "fsdp": shape[1]}
        _compare(single, run, f"mae mesh {shape}")


def test_classifier_sharded_losses_match_single_device(tmp_path):
    # Drop path, mixup/cutmix and RandAugment all active; the mixed (2, 4) mesh.
    extra = dict(model__drop_path_rate=0.1, data__mixup=0.8, data__cutmix=1.0)
    single = _run("classification", (1, 1), tmp_path / "one", devices=jax.devices()[:1], **extra)
    _compare(single, _run("classification", (2, 4), tmp_path / "mesh", **extra), "classifier")


def test_mae_gradient_accumulation_matches_one_big_step(mae_runs, tmp_path):
    """Two microbatches per step on the (2, 4) mesh train like the whole batch on one device:
    the keep-mask is drawn for the whole batch, and the averaged gradient is the batch mean."""
    accumulated = _run("mae", (2, 4), tmp_path, grad_accum_steps=2, peak_flops_per_device=1e12)
    _compare(mae_runs[(1, 1)], accumulated, "mae, 2 microbatches")
    # The MFU report: FLOPs of the plain step (a scan body is counted once by XLA: not here).
    assert accumulated["flops_per_step"] == mae_runs[(1, 1)]["flops_per_step"] > 0
    last = accumulated["history"][-1]
    assert last["tflops_per_sec_per_device"] > 0
    assert last["mfu"] == pytest.approx(last["tflops_per_sec_per_device"] * 1e12 / 1e12)


def test_classifier_gradient_accumulation_with_remat_matches_one_big_step(tmp_path):
    # Drop path off: it draws per microbatch, so only its distribution is the same. Mixup and
    # cutmix are made on the host per batch, so they stay exact.
    extra = dict(model__drop_path_rate=0.0, data__mixup=0.8, data__cutmix=1.0)
    single = _run("classification", (1, 1), tmp_path / "one", devices=jax.devices()[:1], **extra)
    accumulated = _run(
        "classification", (1, 8), tmp_path / "acc", grad_accum_steps=2, model__remat=True, **extra
    )
    _compare(single, accumulated, "classifier, 2 microbatches, remat")
    assert accumulated["flops_per_step"] == single["flops_per_step"]  # remat recompute not counted


def test_batch_not_divisible_into_microbatches_is_refused(tmp_path):
    with pytest.raises(ValueError, match="grad_accum_steps 3 x the 8 devices"):
        _run("mae", (2, 4), tmp_path, grad_accum_steps=3)
    with pytest.raises(ValueError, match="grad_accum_steps=0 is out of range: it must be >= 1"):
        _run("mae", (2, 4), tmp_path, grad_accum_steps=0)


def test_params_and_optimizer_state_sharded_over_fsdp(mae_runs):
    state = mae_runs[(2, 4)]["state"]
    params = state["params"]
    kernel = params["blocks_1"]["mlp"]["fc1"]["kernel"]  # (16, 64) -> split on the 64
    assert kernel.sharding.spec == P(None, "fsdp")
    shard_shapes = {tuple(s.data.shape) for s in kernel.addressable_shards}
    assert shard_shapes == {(16, 16)}, shard_shapes  # a quarter on each device
    assert len(kernel.addressable_shards) == 8  # replicated over the 2 `data` rows
    # Adam's moments are sharded like the parameters.
    adam = next(
        s
        for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda n: hasattr(n, "mu"))
        if hasattr(s, "mu")
    )
    mu = adam.mu["blocks_1"]["mlp"]["fc1"]["kernel"]
    assert mu.sharding.spec == P(None, "fsdp")
    assert {tuple(s.data.shape) for s in mu.addressable_shards} == {(16, 16)}
    # Every leaf with a dimension divisible by 4 is split; the rest are replicated.
    leaves = jax.tree.leaves(params)
    split = [x for x in leaves if "fsdp" in tuple(x.sharding.spec)]
    divisible = [x for x in leaves if any(d % 4 == 0 for d in x.shape)]
    assert len(split) == len(divisible) > 0
    for x in split:
        shard = x.addressable_shards[0].data
        assert shard.size * 4 == x.size


def test_two_processes_match_one(tmp_path, mae_runs):
    """2 processes x 4 CPU devices (jax.distributed over localhost, gloo collectives), each
    feeding only its half of every batch, train like one process with 8 devices."""
    import os

    from hiera_jax.training.metrics import read_jsonl

    values = th.overrides(mesh_shape=(2, 4), total_steps=4, export_model=True, num_vis=2)
    reference = mae_runs[(2, 4)]  # the same config in this process, 8 devices
    workdir = tmp_path / "two"
    procs = th.launch_two_processes(workdir, values, merge_output=True)
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    losses = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if r["kind"] == "train"]
    ref = [h["loss"] for h in reference["history"]]
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=0)
    assert os.path.exists(workdir / "model" / "config.json")
    assert os.listdir(workdir / "checkpoints") == ["4"]
