"""The console scripts: declared in pyproject, installed with the package, and working end to end."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from importlib import metadata

import jax
import numpy as np
import pytest
from PIL import Image

import hiera_jax
from hiera_jax import inference
from hiera_jax.models.factory import init_params

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "hiera-jax-predict": "hiera_jax.inference.cli:main",
    "hiera-jax-convert": "hiera_jax.convert:main",
}


def _declared() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_pyproject_declares_the_command_lines_and_they_resolve():
    assert _declared() == SCRIPTS
    for target in SCRIPTS.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_the_installed_package_has_them():
    """An install of this checkout (`pip install -e .`) puts them on the environment's PATH."""
    installed = {
        ep.name: ep.value
        for ep in metadata.entry_points(group="console_scripts")
        if ep.dist is not None and ep.dist.name == "hiera-jax"
    }
    assert installed == SCRIPTS, "reinstall: pip install -e ."


def _script(name: str) -> str:
    found = shutil.which(
        name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    )
    assert found, f"{name} is not on PATH; reinstall with pip install -e ."
    return found


def test_convert_then_predict_through_the_installed_scripts(tmp_path):
    """hiera-jax-convert copies a model directory; hiera-jax-predict prints its top-5 as the
    library computes it."""
    config = hiera_jax.get_config("hiera_tiny_224", embed_dim=16, stages=(1, 1, 1, 1))
    params = init_params(hiera_jax.HieraForImageClassification(config), jax.random.key(5))
    source = str(tmp_path / "source")
    hiera_jax.save_pretrained(source, params, config, model_type="classification")
    image = str(tmp_path / "photo.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)).save(image)

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        command = [_script(name), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)

    out = str(tmp_path / "converted")
    done = run("hiera-jax-convert", "--input", source, "--output", out)
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout and out in done.stdout

    done = run("hiera-jax-predict", "--checkpoint", out, "--top-k", "1", image)
    assert done.returncode == 0, done.stderr
    probs = inference.Predictor(config, params).predict([image])[0]
    best = int(np.argmax(probs))
    assert f"1. {probs[best]:.4f}" in done.stdout and f"(class {best})" in done.stdout

    done = run("hiera-jax-predict")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("(see hiera-jax-predict --help)")


@pytest.mark.parametrize("form", ["module", "checkout script"])
def test_the_other_forms_run_the_same_converter(form):
    command = (
        [sys.executable, "-m", "hiera_jax.convert", "--help"]
        if form == "module"
        else [sys.executable, os.path.join(ROOT, "convert", "convert_pytorch.py"), "--help"]
    )
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: hiera-jax-convert")
