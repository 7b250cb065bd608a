"""`python -m hiera_jax.predict`: top-5 output, `--features` npz, random-model warning, errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import hiera_jax
from hiera_jax import inference, predict
from hiera_jax.models.factory import abstract_params, init_params
from hiera_jax.models.hiera import HieraModel

SMALL = dict(embed_dim=16, stages=(1, 1, 1, 1), head_init_scale=1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = hiera_jax.get_config("hiera_tiny_224", **SMALL)
    params = init_params(hiera_jax.HieraForImageClassification(config), jax.random.key(3))
    ckpt = str(root / "ckpt")
    hiera_jax.save_pretrained(ckpt, params, config, model_type="classification")
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(240, 320), (300, 260)]):
        path = root / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return root, ckpt, config, params, images


def test_top5_printed_with_names(setup, capsys):
    _, ckpt, config, params, images = setup
    assert predict.main(["--checkpoint", ckpt, *images]) == 0
    out = capsys.readouterr().out
    expected = inference.Predictor(config, params).predict(images)
    names = inference.class_names(1000)
    for path, row in zip(images, expected):
        block = out.split(path)[1].splitlines()[1:6]
        for rank, idx in enumerate(np.argsort(-row)[:5], start=1):
            assert block[rank - 1].strip() == f"{rank}. {row[idx]:.4f}  {names[idx]}  (class {idx})"


def test_features_npz_matches_hiera_model(setup, capsys):
    root, ckpt, config, params, images = setup
    out_path = str(root / "feats" / "features.npz")
    assert predict.main(["--checkpoint", ckpt, "--features", out_path, *images]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = np.load(out_path)
    assert list(saved["files"]) == images
    batch = np.stack([inference.preprocess_image(p) for p in images])
    backbone = {k: v for k, v in params.items() if k != "head"}
    ref = HieraModel(config).apply({"params": backbone}, batch, return_intermediates=True)
    for i, ref_map in enumerate(ref.feature_maps):
        np.testing.assert_allclose(
            saved[f"stage{i + 1}"], np.asarray(ref_map), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(saved["probs"].sum(-1), 1.0, atol=1e-5)


def test_random_model_warns_loudly(setup, capsys):
    _, _, _, _, images = setup
    assert predict.main(["--model", "hiera_tiny_224", "--top-k", "3", images[0]]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err and "MEANINGLESS" in captured.err
    assert "1. " in captured.out and "4. " not in captured.out


def _error_line(argv, capsys) -> str:
    """The one `error: ...` line the CLI prints for `argv` (it exits with code 2)."""
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_bad_inputs_name_the_file(setup, tmp_path, capsys):
    _, ckpt, _, _, images = setup
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    assert "broken.png" in _error_line(["--checkpoint", ckpt, images[0], str(broken)], capsys)
    assert "nowhere.jpg" in _error_line(
        ["--checkpoint", ckpt, str(tmp_path / "nowhere.jpg")], capsys
    )
    # A checkpoint whose config does not fit its weights.
    bad = tmp_path / "mismatch"
    shutil.copytree(ckpt, bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["depths"] = [1, 1, 2, 1]
    (bad / "config.json").write_text(json.dumps(meta))
    err = _error_line(["--checkpoint", str(bad), images[0]], capsys)
    assert re.search(r"mismatch.*does not fit.*does not fill: blocks_3", err), err
    err = _error_line(["--checkpoint", str(tmp_path), images[0]], capsys)
    assert "not a hiera-jax model directory" in err
    assert "--checkpoint DIR, or --model NAME" in _error_line([images[0]], capsys)


def test_too_short_clip_names_the_file(tmp_path, capsys):
    config = hiera_jax.get_config("hiera_base_16x224", embed_dim=8, stages=(1, 1, 1, 1))
    shapes = abstract_params(config, "classification")  # no init needed: it fails before the model
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    ckpt = str(tmp_path / "video")
    hiera_jax.save_pretrained(ckpt, params, config, model_type="classification")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(20):  # a folder of 20 frames: fewer than the 61 a 16x4 clip needs
        Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(frames / f"{i:03d}.png")
    err = _error_line(["--checkpoint", ckpt, str(frames)], capsys)
    assert re.search(r"frames has 20 frames.*at least 61", err)
    assert os.path.isdir(frames)
