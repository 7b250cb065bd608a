"""Inference: preprocessing vs torchvision, batched predict, features, clips, other sizes, bf16."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import hiera_jax
from hiera_jax import inference
from hiera_jax.models import pos_embed
from hiera_jax.models.factory import init_params
from hiera_jax.models.hiera import HieraModel

# A narrow, shallow classifier at the official 224 input: same code paths, a fraction of the cost.
SMALL = dict(embed_dim=16, stages=(1, 1, 1, 1), head_init_scale=1.0)


def _rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random image (noise would make bicubic resizing look worse than it is)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    noise = rng.integers(-20, 21, (height, width, 3))
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), np.int64)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).convert(mode)


def _torchvision_reference(image: Image.Image, crop: int = 224) -> np.ndarray:
    """The official example's transform, run by torchvision itself (the independent reference)."""
    T = pytest.importorskip("torchvision.transforms")

    transform = T.Compose(
        [
            T.Resize(int(256 / 224 * crop), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    return transform(image.convert("RGB")).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A saved classifier directory (the format the converter and train.py write)."""
    config = hiera_jax.get_config("hiera_tiny_224", **SMALL)
    model = hiera_jax.HieraForImageClassification(config)
    params = init_params(model, jax.random.key(0))
    directory = str(tmp_path_factory.mktemp("ckpt") / "small")
    hiera_jax.save_pretrained(directory, params, config, model_type="classification", name="small")
    return directory, config, params


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real files of several sizes and modes, written with PIL."""
    folder = tmp_path_factory.mktemp("images")
    specs = [((300, 400), "RGB", "png"), ((480, 270), "RGB", "jpg"), ((256, 256), "L", "png")]
    paths = []
    for i, (size, mode, ext) in enumerate(specs):
        path = folder / f"img{i}.{ext}"
        _image(*size, seed=i, mode=mode).save(path)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [(300, 400), (480, 270), (224, 224), (100, 150), (257, 999)])
def test_preprocess_matches_torchvision(size):
    image = _image(*size, seed=sum(size))
    ours = inference.preprocess_image(image)
    ref = _torchvision_reference(image)
    assert ours.shape == ref.shape == (224, 224, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_preprocess_other_crop_and_modes():
    image = _image(333, 500, seed=3, mode="RGBA")
    np.testing.assert_allclose(
        inference.preprocess_image(image, 256), _torchvision_reference(image, 256), atol=1e-5
    )
    # uint8 arrays go through exactly the same path as PIL images.
    array = np.asarray(image.convert("RGB"))
    ours_uint8 = inference.preprocess_image(image)
    np.testing.assert_array_equal(inference.preprocess_image(array), ours_uint8)
    # [0, 1] float arrays are resampled per channel in float (no 8-bit rounding or clipping of
    # the bicubic overshoot), so they differ from the uint8 result by a few grey levels at most.
    diff = np.abs(inference.preprocess_image(array.astype(np.float32) / 255.0) - ours_uint8)
    assert diff.max() < 6 / 255 / 0.225 and diff.mean() < 1 / 255 / 0.225


def test_class_names_bundled():
    imagenet, kinetics = inference.class_names(1000), inference.class_names(400)
    assert len(imagenet) == 1000 and imagenet[0] == "tench" and imagenet[999] == "toilet tissue"
    assert len(kinetics) == 400 and kinetics[0] == "abseiling"
    assert inference.class_names(3) == ("class_0", "class_1", "class_2")


# ---------------------------------------------------------------------- predict
def test_predict_files_match_model_apply(small_checkpoint, image_files):
    directory, config, params = small_checkpoint
    # batch_size 2 over 3 files: one full chunk and one padded chunk.
    predictor = inference.Predictor.from_pretrained(directory, batch_size=2)
    probs = predictor.predict(image_files)
    assert probs.shape == (3, 1000) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)

    batch = np.stack([_torchvision_reference(Image.open(p)) for p in image_files])
    model = hiera_jax.HieraForImageClassification(config)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch))
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-7)
    assert np.abs(probs - 1 / 1000).max() > 1e-4  # the head is not degenerate

    top = predictor.top_k(image_files, k=5)
    names = inference.class_names(1000)
    for row, p in zip(top, probs):
        assert [name for name, _ in row] == [names[i] for i in np.argsort(-p)[:5]]
        assert row[0][1] == pytest.approx(p.max())

    # The functional form gives the same result.
    np.testing.assert_allclose(
        inference.predict(model, params, image_files, batch_size=4), probs, rtol=1e-5, atol=1e-8
    )


def test_features_match_hiera_model(small_checkpoint, image_files):
    directory, config, params = small_checkpoint
    predictor = inference.Predictor.from_pretrained(directory)
    maps = predictor.features(image_files[:2])
    batch = predictor.preprocess(image_files[:2])
    backbone = {k: v for k, v in params.items() if k != "head"}
    model = HieraModel(config)
    out = jax.jit(lambda p, x: model.apply(p, x, return_intermediates=True))(
        {"params": backbone}, batch
    )
    assert list(maps) == ["stage1", "stage2", "stage3", "stage4"]
    for ours, ref in zip(maps.values(), out.feature_maps):
        np.testing.assert_allclose(ours, np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert maps["stage1"].shape == (2, 56, 56, 16) and maps["stage4"].shape == (2, 7, 7, 128)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match="broken.jpg"):
        inference.load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        inference.load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------- video clips
def test_clip_indices_and_too_short():
    idx = inference.clip_indices(100, 16, 4)
    assert len(idx) == 16 and np.all(np.diff(idx) == 4) and idx[0] == (100 - 61) // 2
    np.testing.assert_array_equal(inference.clip_indices(61, 16, 4, start=0), np.arange(0, 61, 4))
    with pytest.raises(ValueError, match=r"short\.npy has 60 frames.*at least 61"):
        inference.clip_indices(60, 16, 4, source="short.npy")


def test_video_predict_and_short_clip(tmp_path):
    config = hiera_jax.get_config("hiera_base_16x224", embed_dim=8, stages=(1, 1, 1, 1))
    params = init_params(hiera_jax.HieraForImageClassification(config), jax.random.key(1))
    predictor = inference.Predictor(config, params, batch_size=1)
    assert predictor.names[0] == "abseiling"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (64, 120, 160, 3), dtype=np.uint8)
    clip_path = tmp_path / "clip.npy"
    np.save(clip_path, frames)
    probs = predictor.predict([str(clip_path)])
    assert probs.shape == (1, 400)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # The clip the model saw: frames 1, 5, ..., 61 (centred), each preprocessed as an image.
    clip = np.stack([inference.preprocess_image(frames[i]) for i in range(1, 62, 4)])
    np.testing.assert_array_equal(predictor.preprocess([str(clip_path)])[0], clip)
    short_path = tmp_path / "short_clip.npy"
    np.save(short_path, frames[:40])
    with pytest.raises(ValueError, match="short_clip.npy has 40 frames"):
        predictor.predict([str(short_path)])


# ---------------------------------------------------------------------- other resolutions
def test_pos_embed_interpolation_is_identity_at_native_size():
    rng = np.random.default_rng(0)
    for n in (7, 14, 56):
        np.testing.assert_array_equal(pos_embed.interpolation_matrix(n, n), np.eye(n))
        np.testing.assert_array_equal(pos_embed.interpolation_matrix(n, n, "linear"), np.eye(n))
    table = rng.normal(size=(1, 56 * 56, 8)).astype(np.float32)
    np.testing.assert_array_equal(pos_embed.resize_grid(table, (56, 56), (56, 56)), table)
    video = rng.normal(size=(1, 8 * 14 * 14, 4)).astype(np.float32)
    np.testing.assert_array_equal(pos_embed.resize_grid(video, (8, 14, 14), (8, 14, 14)), video)


@pytest.mark.parametrize("grid_in,grid_out", [((56, 56), (64, 64)), ((14, 14), (12, 20))])
def test_pos_embed_interpolation_matches_torch(grid_in, grid_out):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    table = np.random.default_rng(1).normal(size=(1, grid_in[0] * grid_in[1], 6)).astype(np.float32)
    ref = F.interpolate(
        torch.from_numpy(table.reshape(1, *grid_in, 6)).permute(0, 3, 1, 2),
        size=grid_out,
        mode="bicubic",
        align_corners=False,
    )
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 6).numpy()
    np.testing.assert_allclose(pos_embed.resize_grid(table, grid_in, grid_out), ref, atol=1e-4)
    temporal = table[:, :8]
    ref_t = F.interpolate(torch.from_numpy(temporal).permute(0, 2, 1), size=12, mode="linear")
    np.testing.assert_allclose(
        pos_embed.resize_grid(temporal, (8,), (12,)), ref_t.permute(0, 2, 1).numpy(), atol=1e-5
    )


def test_load_pretrained_native_size_is_unchanged(small_checkpoint):
    directory, config, params = small_checkpoint
    model, loaded = hiera_jax.load_pretrained(directory, input_size=(224, 224))
    assert model.config == config
    np.testing.assert_array_equal(np.asarray(loaded["pos_embed"]), np.asarray(params["pos_embed"]))


def test_load_pretrained_at_256_runs(small_checkpoint, image_files):
    directory, config, params = small_checkpoint
    model, loaded = hiera_jax.load_pretrained(directory, input_size=256)
    assert model.config.input_size == (256, 256)
    assert loaded["pos_embed"].shape == (1, 64 * 64, 16)
    expected = pos_embed.resize_grid(np.asarray(params["pos_embed"]), (56, 56), (64, 64))
    np.testing.assert_allclose(np.asarray(loaded["pos_embed"]), expected, rtol=1e-6)
    predictor = inference.Predictor.from_pretrained(directory, input_size=256)
    batch = predictor.preprocess(image_files[:1])
    assert batch.shape == (1, 256, 256, 3)
    probs = predictor.predict(batch, preprocessed=True)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # At 256 the model is the 224 model with a resampled table: the rest of the params are shared.
    logits = jax.jit(model.apply)({"params": loaded}, batch)
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="input_size=.250, 250."):
        hiera_jax.load_pretrained(directory, input_size=250)


def test_video_pos_embed_resized_separately():
    config = hiera_jax.get_config("hiera_base_16x224", embed_dim=8, stages=(1, 1, 1, 1))
    params = init_params(hiera_jax.HieraForImageClassification(config), jax.random.key(2))
    target = config.replace(input_size=(32, 256, 256))
    resized = pos_embed.resize_pos_embed_params(params, config, target)
    assert resized["pos_embed_spatial"].shape == (1, 64 * 64, 8)
    assert resized["pos_embed_temporal"].shape == (1, 16, 8)
    np.testing.assert_allclose(
        resized["pos_embed_spatial"],
        pos_embed.resize_grid(np.asarray(params["pos_embed_spatial"]), (56, 56), (64, 64)),
    )
    logits = jax.jit(hiera_jax.HieraForImageClassification(target).apply)(
        {"params": resized}, np.zeros((1, 32, 256, 256, 3), np.float32)
    )
    assert logits.shape == (1, 400)


def test_checkpoint_that_does_not_fit(small_checkpoint, tmp_path):
    directory, _, _ = small_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    weights = os.path.join(directory, "model.safetensors")  # the small model's weights
    os.symlink(weights, bad / "model.safetensors")
    with open(os.path.join(directory, "config.json")) as f:
        meta = json.load(f)
    meta["embed_dim"] = 32
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"bad/model.safetensors does not fit"):
        inference.Predictor.from_pretrained(str(bad))


# ---------------------------------------------------------------------- precision
def test_bfloat16_close_to_float32(small_checkpoint, image_files):
    directory, _, _ = small_checkpoint
    f32 = inference.Predictor.from_pretrained(directory)
    bf16 = inference.Predictor.from_pretrained(directory, dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(bf16.params))  # params stay f32
    batch = f32.preprocess(image_files)
    err = _rel(
        bf16.features(batch, preprocessed=True)["stage4"],
        f32.features(batch, preprocessed=True)["stage4"],
    )
    model32 = hiera_jax.HieraForImageClassification(f32.config)
    model16 = hiera_jax.HieraForImageClassification(bf16.config)
    logits32 = np.asarray(jax.jit(model32.apply)({"params": f32.params}, batch))
    logits16 = np.asarray(jax.jit(model16.apply)({"params": bf16.params}, batch))
    logit_err = _rel(logits16, logits32)
    print(f"bf16 vs f32 relative error: logits {logit_err:.2e}, stage4 {err:.2e}")
    assert 1e-4 < logit_err < 5e-2 and 1e-4 < err < 5e-2  # really bf16, and close


def test_train_py_style_checkpoint_keeps_its_normalisation_and_channels(tmp_path):
    """A 1-channel model saved with its data mean/std (as train.py does) predicts on a PNG."""
    cfg = hiera_jax.HieraConfig(
        input_size=(32, 32),
        in_chans=1,
        embed_dim=8,
        num_heads=1,
        num_classes=10,
        stages=(1, 1),
        mask_unit_attn=(True, False),
        q_pool=1,
        mask_unit_size=(4, 4),
        patch_kernel=(3, 3),
        patch_stride=(2, 2),
        patch_padding=(1, 1),
    )
    model = hiera_jax.HieraForImageClassification(cfg)
    params = hiera_jax.init_params(model, jax.random.key(0))
    directory = str(tmp_path / "digits")
    hiera_jax.save_pretrained(
        directory,
        params,
        cfg,
        model_type="classification",
        preprocessing={"mean": (0.5,), "std": (0.5,)},
    )
    pixels = np.random.RandomState(0).randint(0, 256, (36, 36), np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "digit.png")

    predictor = inference.Predictor.from_pretrained(directory)
    batch = predictor.preprocess([str(tmp_path / "digit.png")])
    # 36 = int(256 / 224 * 32): no resize, a centre 32x32 crop, then (x - 0.5) / 0.5 on one channel.
    expected = (pixels[2:34, 2:34].astype(np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(batch[..., 0][0], expected, atol=1e-6)
    assert batch.shape == (1, 32, 32, 1)
    probs = predictor.predict([str(tmp_path / "digit.png")])
    np.testing.assert_allclose(
        probs, jax.nn.softmax(jax.jit(model.apply)({"params": params}, batch)), rtol=1e-5, atol=1e-7
    )
