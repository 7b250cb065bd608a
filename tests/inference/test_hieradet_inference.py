"""SAM 2's HieraDet as a classifier (timm's head) and through the inference API and command line.

The classifier is checked against timm's `hieradet_sam2.HieraDet(num_classes=N)` in float32 on
random weights (head included); the Predictor and `python -m hiera_jax.predict` against our own
modules applied directly (their parity with timm and SAM 2 is in test_hieradet*.py), one device
and split over four, float32 and bfloat16.
"""

from __future__ import annotations

import json

import flax
import jax
import numpy as np
import pytest
from helpers.reference import random_input, randomise_hieradet, rel_err, to_torch
from PIL import Image

from hiera_jax import inference
from hiera_jax.inference import cli
from hiera_jax.models import hieradet, hieradet_neck
from hiera_jax.weights import hieradet_convert as convert
from hiera_jax.weights.hieradet_loading import is_hieradet_source, load_hieradet, save_hieradet

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytestmark = pytest.mark.reference
TOL = 1e-4
SIZE = (128, 128)


def _timm_classifier(num_classes=10, seed=0):
    with torch.device("meta"):
        model = timm.create_model("sam2_hiera_tiny", pretrained=False, num_classes=num_classes)
    model = randomise_hieradet(model.to_empty(device="cpu"), seed=seed)
    with torch.no_grad():  # the head too: timm starts it at 0.001 x trunc-normal, zero bias
        model.head.norm.weight.normal_(1.0, 0.2)
        model.head.norm.bias.normal_(0.0, 0.2)
        model.head.fc.weight.normal_(0.0, 0.05)
        model.head.fc.bias.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """timm's classifier converted, saved by `save_hieradet` (as train.py exports a finetune)."""
    reference = _timm_classifier()
    cfg = hieradet.get_config("sam2_hiera_tiny", num_classes=10, input_size=SIZE)
    params = convert.convert_state_dict(reference.state_dict(), cfg, classifier=True)
    folder = tmp_path_factory.mktemp("hieradet_classifier")
    save_hieradet(folder, params, cfg, architecture="sam2_hiera_tiny", crop_pct=1.0)
    return folder, reference, cfg, params


def test_classifier_matches_timm_and_exports_back(classifier_dir, record_parity):
    folder, reference, cfg, params = classifier_dir
    x = random_input((2, *SIZE, 3), seed=1)
    with torch.no_grad():
        expected = reference(to_torch(x)).numpy()
    model = hieradet.HieraDetForImageClassification(cfg)
    logits, extras = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))(
        params, x
    )
    err = rel_err(logits, expected)
    assert record_parity(f"sam2_hiera_tiny classifier @{SIZE}", "timm", "logits", err) < TOL
    with torch.no_grad():
        maps = reference.forward_intermediates(to_torch(x), intermediates_only=True)
    worst = max(
        rel_err(a, b.numpy().transpose(0, 2, 3, 1)) for a, b in zip(extras["feature_maps"], maps)
    )
    assert worst < TOL

    # Exported: timm's keys exactly (head included); it loads strictly and round-trips.
    exported = convert.export_state_dict(params, cfg)
    assert exported.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    with pytest.raises(ValueError, match="no classifier head.*format='timm'"):
        convert.export_state_dict(params, cfg, format="sam2")
    # The trunk-only conversion skips the head, as before.
    trunk = convert.convert_state_dict(reference.state_dict(), cfg)
    assert "head" not in trunk and trunk.keys() == {k for k in params if k != "head"}

    # save_hieradet's directory: timm's config.json fields; load_hieradet reads it back.
    meta = json.loads((folder / "config.json").read_text())
    assert meta["architecture"] == "sam2_hiera_tiny" and meta["num_classes"] == 10
    assert meta["pretrained_cfg"]["input_size"] == [3, *SIZE]
    module, loaded = load_hieradet(folder, classifier=True)
    assert isinstance(module, hieradet.HieraDetForImageClassification)
    assert module.config == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    module, trunk_only = load_hieradet(folder)  # the default is the trunk
    assert isinstance(module, hieradet.HieraDet) and "head" not in trunk_only
    assert is_hieradet_source(folder) and not is_hieradet_source(folder / "nothing")


def test_remat_changes_nothing_but_memory():
    cfg = hieradet.get_config("sam2_hiera_tiny", num_classes=5, input_size=(64, 64))
    x = random_input((2, 64, 64, 3), seed=2)
    model = hieradet.HieraDetForImageClassification(cfg)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]

    def grads(config):
        module = hieradet.HieraDetForImageClassification(config)
        loss = lambda p: (module.apply({"params": p}, x, train=True) ** 2).mean()  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(cfg), grads(cfg.replace(remat=True))
    for (path, a), b in zip(flax.traverse_util.flatten_dict(plain).items(), jax.tree.leaves(remat)):
        assert rel_err(b, a) < 1e-5, path


def test_predictor_classifier(classifier_dir, tmp_path):
    folder, _, cfg, params = classifier_dir
    predictor = inference.Predictor.from_pretrained(str(folder), batch_size=4)
    assert predictor.has_head and predictor.config == cfg
    rng = np.random.RandomState(3)
    images = [rng.randint(0, 256, (160, 140, 3), dtype=np.uint8) for _ in range(3)]
    batch = predictor.preprocess(images)
    assert batch.shape == (3, *SIZE, 3)
    # crop_pct 1.0 (saved): the short side to 128, centre crop, ImageNet's mean/std.
    expected_batch = np.stack(
        [inference.preprocess.transform_image(im, short_side=128, crop=SIZE) for im in images]
    )
    np.testing.assert_allclose(batch, expected_batch, atol=1e-6)
    model = hieradet.HieraDetForImageClassification(cfg)
    logits = jax.jit(model.apply)({"params": params}, batch)
    probs = predictor.predict(images)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, -1), atol=1e-6)
    top = predictor.top_k(images, k=2)
    assert [len(t) for t in top] == [2, 2, 2] and top[0][0][1] == pytest.approx(probs[0].max())
    feats = predictor.features(images)
    _, maps = jax.jit(hieradet.HieraDet(cfg).apply, static_argnums=2)(
        {"params": {k: v for k, v in params.items() if k != "head"}}, batch, True
    )
    assert sorted(feats) == ["stage1", "stage2", "stage3", "stage4"]
    for i, m in enumerate(maps):
        assert rel_err(feats[f"stage{i + 1}"], m) < 1e-5


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory):
    """A SAM 2 checkpoint (`{"model": ...}`, torch.save) of random image-encoder weights."""
    trunk = hieradet.get_config("sam2_hiera_tiny", input_size=SIZE)
    encoder = hieradet_neck.ImageEncoder(trunk)
    x = np.zeros((1, *SIZE, 3), np.float32)
    params = jax.jit(encoder.init)(jax.random.key(1), x)["params"]
    params = jax.tree.map(
        lambda p: np.asarray(p) + 0.05 * np.random.RandomState(p.size % 97).randn(*p.shape), params
    )
    state = convert.export_image_encoder_state_dict(params, trunk, format="sam2")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    return path, trunk, jax.tree.map(lambda p: np.asarray(p, np.float32), params)


def test_predictor_image_encoder_sharded_and_bf16(encoder_checkpoint):
    path, trunk, params = encoder_checkpoint
    predictor = inference.Predictor.from_pretrained(str(path), input_size=SIZE[0], batch_size=4)
    assert predictor.model_type == "encoder" and not predictor.has_head
    with pytest.raises(ValueError, match="no classifier head"):
        predictor.predict([np.zeros((8, 8, 3), np.uint8)])
    rng = np.random.RandomState(4)
    images = [rng.randint(0, 256, (100, 150, 3), dtype=np.uint8) for _ in range(5)]
    batch = predictor.preprocess(images)  # SAM 2's: the whole image resized to 128x128
    expected_batch = np.stack(
        [
            inference.preprocess.transform_image(im, resize_to=SIZE, resample=Image.BILINEAR)
            for im in images
        ]
    )
    np.testing.assert_allclose(batch, expected_batch, atol=1e-6)
    feats = predictor.features(batch, preprocessed=True)
    ref = jax.jit(hieradet_neck.ImageEncoder(trunk).apply)({"params": params}, batch)
    assert rel_err(feats["vision_features"], ref["vision_features"]) < 1e-5
    for i, level in enumerate(ref["backbone_fpn"]):
        assert rel_err(feats[f"backbone_fpn{i}"], level) < 1e-5
        assert rel_err(feats[f"vision_pos_enc{i}"], ref["vision_pos_enc"][i]) < 1e-6
    _, maps = jax.jit(hieradet.HieraDet(trunk).apply, static_argnums=2)(
        {"params": params["trunk"]}, batch, True
    )
    for i, m in enumerate(maps):
        assert rel_err(feats[f"stage{i + 1}"], m) < 1e-5

    # Split over 4 devices: the same numbers (5 inputs, chunks padded to a multiple of 4).
    assert jax.device_count() >= 4
    sharded = inference.Predictor.from_pretrained(
        str(path), input_size=SIZE[0], batch_size=4, devices=jax.devices()[:4]
    )
    assert sharded.mesh is not None and sharded.mesh.size == 4
    out = sharded.features(batch, preprocessed=True)
    for key, value in feats.items():
        assert rel_err(out[key], value) < 1e-5, key

    # bfloat16 compute: close to float32, and not equal to it.
    bf16 = inference.Predictor.from_pretrained(
        str(path), input_size=SIZE[0], batch_size=8, dtype="bfloat16"
    )
    low = bf16.features(batch, preprocessed=True)["vision_features"]
    err = rel_err(np.asarray(low, np.float32), feats["vision_features"])
    assert 1e-4 < err < 5e-2


def test_cli_features_and_top5(encoder_checkpoint, classifier_dir, tmp_path, capsys):
    path, trunk, params = encoder_checkpoint
    image = tmp_path / "a.png"
    Image.fromarray(np.random.RandomState(5).randint(0, 256, (90, 120, 3), dtype=np.uint8)).save(
        image
    )
    out = tmp_path / "f.npz"
    args = ["--checkpoint", str(path), "--input-size", str(SIZE[0]), "--features", str(out)]
    assert cli.main([*args, "--shard", str(image)]) == 0
    saved = np.load(out)
    assert {"vision_features", "backbone_fpn0", "vision_pos_enc2", "stage4", "files"} <= set(
        saved.files
    )
    direct = inference.Predictor.from_pretrained(str(path), input_size=SIZE[0]).features([image])
    assert rel_err(saved["vision_features"], direct["vision_features"]) < 1e-5
    # Without --features an encoder has nothing to print: one line says so.
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(path), str(image)])
    assert "no classifier head" in capsys.readouterr().err

    folder = classifier_dir[0]
    assert cli.main(["--checkpoint", str(folder), "--top-k", "3", str(image)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(class ") == 3


def test_create_model_takes_sam2_names_as_timm_does(classifier_dir):
    import hiera_jax

    model = hiera_jax.create_model("sam2_hiera_small", num_classes=7, input_size=(64, 64))
    assert isinstance(model, hieradet.HieraDetForImageClassification)
    expected = hieradet.get_config("sam2_hiera_small", num_classes=7, input_size=(64, 64))
    assert model.config == expected
    with torch.device("meta"):
        reference = timm.create_model("sam2_hiera_small", pretrained=False, num_classes=7)
    ours = convert.abstract_params(model.config, classifier=True)
    shapes = {k: tuple(np.shape(v)) for k, v in convert.export_state_dict(
        jax.tree.map(lambda a: np.zeros(a.shape, np.float32), ours), model.config
    ).items()}  # fmt: skip
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for trunk in (
        hiera_jax.create_model("sam2_hiera_tiny"),
        hiera_jax.create_model("sam2_hiera_tiny", num_classes=0),
    ):
        assert type(trunk) is hieradet.HieraDet
        assert trunk.config == hieradet.get_config("sam2_hiera_tiny")
    folder, _, cfg, params = classifier_dir
    module, loaded = hiera_jax.create_model(str(folder), pretrained=True, classifier=True)
    assert module.config == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_cli_random_sam2_encoder_warns_and_writes_features(tmp_path, capsys):
    image = tmp_path / "b.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    out = tmp_path / "r.npz"
    args = ["--model", "sam2_hiera_tiny", "--input-size", "64", "--features", str(out), str(image)]
    assert cli.main(args) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    saved = np.load(out)
    assert saved["vision_features"].shape == (1, 4, 4, 256)  # stride 16, as SAM 2 at 1024: 64x64
    assert saved["stage4"].shape == (1, 2, 2, 768)
    with pytest.raises(SystemExit):
        cli.main(["--model", "sam2_hiera_tiniest", str(image)])
    assert "did you mean sam2_hiera_tiny" in capsys.readouterr().err
