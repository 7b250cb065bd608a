"""`hiera_jax.export_model`: a jax.export artifact that runs with nothing but jax, equal to the
live model at two batch sizes; `Predictor.from_exported` and the CLI's `--export`."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hiera_jax
from hiera_jax.inference import Predictor, cli
from hiera_jax.inference.export import load_exported, meta_path

SIZE = (64, 64)  # a tiny Hiera at 64x64: small artifacts, quick lowering
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a server runs: only jax, numpy and json. flax and hiera_jax cannot be imported.
JAX_ONLY = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("flax", "hiera_jax"):
                raise ImportError(f"{name} is blocked: the artifact must run with jax alone")

    sys.meta_path.insert(0, Block())
    import jax, numpy as np

    path, inputs, out = sys.argv[1:4]
    exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
    meta = json.load(open(path + ".json"))
    x = np.load(inputs)
    results = {f"b{n}": np.asarray(exported.call(x[:n])) for n in (1, len(x))}
    np.savez(out, **results)
    print(json.dumps({"platforms": list(exported.platforms), "loaded": sorted(
        m for m in sys.modules if m.split(".")[0] in ("flax", "hiera_jax"))}))
    """
)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A random tiny classifier, its artifact for cpu, cuda and tpu, and normalised inputs."""
    predictor = Predictor.random("hiera_tiny_224", input_size=SIZE)
    path = os.fspath(tmp_path_factory.mktemp("export") / "tiny.jaxexport")
    hiera_jax.export_model(predictor, path=path)
    x = np.random.RandomState(0).randn(3, *SIZE, 3).astype(np.float32)
    return predictor, path, x


def test_the_artifact_runs_with_jax_alone(classifier, tmp_path):
    predictor, path, x = classifier
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "serve.py"
    script.write_text(JAX_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["platforms"] == ["cpu", "cuda", "tpu"]
    out = np.load(tmp_path / "out.npz")
    live = predictor.predict(x, preprocessed=True)
    for n in (1, 3):  # one symbolic batch dimension, two batch sizes
        np.testing.assert_allclose(out[f"b{n}"], live[:n], rtol=1e-5, atol=1e-7)


def test_the_json_says_how_to_feed_it(classifier):
    predictor, path, _ = classifier
    meta = json.load(open(meta_path(path)))
    assert meta["input_shape"] == ["b", *SIZE, 3] and meta["input_layout"] == "BHWC"
    assert meta["mean"] == list(predictor.mean) and meta["std"] == list(predictor.std)
    assert meta["labels"] == list(predictor.names) and meta["outputs"] == ["probs"]
    assert meta["jax_version"] and meta["task"] == "classify"


def test_a_shape_it_cannot_take_is_one_clear_error(classifier):
    _, path, x = classifier
    call, _ = load_exported(path)
    with pytest.raises(ValueError, match=r"takes a batch of shape \['b', 64, 64, 3\]"):
        call(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="takes a batch of shape"):
        call(x[0])  # one image without its batch axis
    with pytest.raises(ValueError, match="normalised float32"):
        call((x * 50).astype(np.uint8))


def test_predictor_runs_an_artifact_as_the_live_model(classifier):
    predictor, path, _ = classifier
    exported = Predictor.from_exported(path, batch_size=4)
    images = (np.random.RandomState(1).rand(5, 80, 70, 3) * 255).astype(np.uint8)
    np.testing.assert_allclose(exported.predict(images), predictor.predict(images), atol=1e-6)
    for ours, live in zip(exported.top_k(images, 2), predictor.top_k(images, 2), strict=True):
        assert [name for name, _ in ours] == [name for name, _ in live]
        np.testing.assert_allclose([p for _, p in ours], [p for _, p in live], atol=1e-6)


def test_features_of_a_transformers_style_model(tmp_path):
    model = hiera_jax.HieraModel(hiera_jax.HieraConfig(embed_dim=8, image_size=list(SIZE)))
    path = hiera_jax.export_model(model, path=tmp_path / "feat.jaxexport", platforms=("cpu",))
    call, meta = load_exported(path)
    assert meta["task"] == "features" and meta["outputs"] == [
        "stage1",
        "stage2",
        "stage3",
        "stage4",
    ]
    x = np.random.RandomState(2).randn(2, *SIZE, 3).astype(np.float32)
    live = Predictor(model.config, model.params, model_type="backbone").features(
        x, preprocessed=True
    )
    got = call(x)
    for name in meta["outputs"]:
        np.testing.assert_allclose(np.asarray(got[name]), live[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no classifier head"):
        hiera_jax.export_model(model, path=tmp_path / "x", task="classify")


def test_cli_exports_then_runs_the_artifact(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray((np.random.RandomState(3).rand(40, 50, 3) * 255).astype(np.uint8)).save(image)
    artifact = str(tmp_path / "m.jaxexport")
    args = ["--model", "hiera_tiny_224", "--input-size", "64", "--export", artifact,
            "--export-platforms", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out and os.path.isfile(meta_path(artifact))
    assert cli.main(["--checkpoint", artifact, "--top-k", "2", str(image)]) == 0
    shown = capsys.readouterr().out
    assert cli.main(["--model", "hiera_tiny_224", "--input-size", "64", "--top-k", "2",
                     str(image)]) == 0  # fmt: skip
    assert capsys.readouterr().out == shown  # the same top-2, the same probabilities
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", artifact, "--input-size", "96", str(image)])
    assert "exported model" in capsys.readouterr().err


def test_sam2_image_encoder_outputs(tmp_path):
    """SAM 2's encoder (trunk + FPN neck): every ImageEncoder output, as the live model's."""
    predictor = Predictor.random("sam2_hiera_tiny", input_size=(256, 256))
    path = hiera_jax.export_model(predictor, path=tmp_path / "sam2.jaxexport", platforms=("cpu",))
    call, meta = load_exported(path)
    assert {"vision_features", "backbone_fpn0", "vision_pos_enc0", "stage4"} <= set(meta["outputs"])
    x = np.random.RandomState(4).randn(2, 256, 256, 3).astype(np.float32)
    got, live = call(x), predictor.features(x, preprocessed=True)
    assert sorted(live) == meta["outputs"]
    for name in meta["outputs"]:
        np.testing.assert_allclose(np.asarray(got[name]), live[name], rtol=1e-5, atol=1e-5)


def test_the_command_line_starts_without_the_plugins_noise(tmp_path):
    """On a machine without GPU or TPU, the CUDA plugin's traceback and libtpu's error lines
    (the dev extra installs both) become one note; the command's own output follows."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "hiera_jax.predict", "--model", "hiera_tiny_224", "--input-size",
         "64", "--export", str(tmp_path / "m.jaxexport"), "--export-platforms", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout
    for noise in ("Traceback", "TPU_WORKER_HOSTNAMES", "host bounds", "cuInit"):
        assert noise not in done.stderr, done.stderr
