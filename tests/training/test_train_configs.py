"""Every config file builds a valid model config; bf16 compute and remat train with fp32 params."""

from __future__ import annotations

import glob
import importlib.util
import os

from helpers import train as th

th.force_cpu_devices()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hiera_jax.training.config import resolve_model_config  # noqa: E402
from hiera_jax.training.loop import train_and_evaluate  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(th.REPO, "configs", "*.py")))
SIZES = {
    "in1k_mae": ["tiny", "huge"],
    "in1k_finetune": ["tiny", "huge"],
    "in1k_mae_abswin": ["tiny", "large"],
    "in1k_hieradet_finetune": ["tiny", "large"],
    "k400_mae": ["base", "huge"],
    "k400_finetune": ["base", "huge"],
}


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_builds(path):
    module = _load(path)
    name = os.path.basename(path)[:-3]
    for arg in SIZES.get(name, [None]):
        config = module.get_config(arg)
        model = resolve_model_config(config)  # validates shapes
        assert config.task in ("mae", "classification")
        assert config.batch_size > 0 and config.optim.lr > 0
        assert (config.num_epochs > 0) or (config.total_steps > 0)
        assert (len(model.input_size) == 3) == name.startswith(("k400", "moving"))
        assert module.__doc__ and "train.py" in module.__doc__  # the launch command
    if name.startswith("in1k") or name.startswith("k400"):
        with pytest.raises(ValueError, match="size must be one of"):
            module.get_config("gigantic")


@pytest.mark.skipif(jax.device_count() < th.N_DEVICES, reason="needs 8 (simulated) devices")
def test_bfloat16_and_remat_train(tmp_path):
    values = th.overrides(
        total_steps=3, model__dtype="bfloat16", model__remat=True, mesh_shape=(1, 2)
    )
    summary = train_and_evaluate(
        th.make_config("mae", values),
        str(tmp_path),
        devices=jax.devices()[:2],
        return_params=True,
        progress=False,
    )
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert {np.asarray(x).dtype for x in jax.tree.leaves(summary["params"])} == {
        np.dtype("float32")
    }


def test_url_workdir_and_init_from_are_refused_with_the_mount_advice(tmp_path):
    from hiera_jax.training.loop import load_encoder

    config = th.make_config("mae")
    with pytest.raises(ValueError, match="gcsfuse"):
        train_and_evaluate(config, "gs://bucket/run", progress=False)
    with pytest.raises(ValueError, match="init_from=gs://bucket/mae is a URL"):
        load_encoder("gs://bucket/mae", {})
    assert not os.path.exists("gs:")  # nothing was created under a mangled local path
