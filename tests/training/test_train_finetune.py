"""Pretrain then finetune end to end, what a person sees (PNG, JSON lines, TensorBoard), and the
optimizer and input pieces the recipes rely on."""

from __future__ import annotations

import json
import os

from helpers import train as th

th.force_cpu_devices()

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from hiera_jax.training import optim  # noqa: E402
from hiera_jax.training.inputs import data as data_lib  # noqa: E402
from hiera_jax.training.loop import train_and_evaluate  # noqa: E402
from hiera_jax.training.metrics import read_jsonl  # noqa: E402
from hiera_jax.weights.loading import load_pretrained  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < th.N_DEVICES, reason="needs 8 (simulated) devices set before jax import"
)


def _train(task, values, workdir, **kw):
    """On 2 of the 8 devices, mesh (1, 2): cheaper to compile, still FSDP-sharded."""
    values = {**values, "mesh_shape": (1, 2)}
    config = th.make_config(task, values) if isinstance(task, str) else task
    return train_and_evaluate(config, str(workdir), devices=jax.devices()[:2], progress=False, **kw)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    mae_dir = tmp_path_factory.mktemp("mae")
    values = th.overrides(total_steps=6, eval_every=0, export_model=True, num_vis=4)
    return mae_dir, _train("mae", values, mae_dir)


def test_pretrain_then_finetune(tmp_path, mae_run):
    mae_dir, mae = mae_run
    assert mae["step"] == 6 and np.isfinite(mae["eval"]["loss"])
    # What a person gets: the reconstruction grid, JSON lines, TensorBoard events, the model.
    png = Image.open(os.path.join(mae["pictures_dir"], "reconstruction_000006.png"))
    assert png.size[0] > png.size[1] / 4 * 3 - 10  # 4 rows of input | masked | reconstruction
    records = read_jsonl(mae["metrics_file"])
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [6]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(mae_dir / "tensorboard"))
    _, mae_params = load_pretrained(mae["model_dir"])

    # Finetune from the MAE workdir. Step 1 runs at lr 0 (warmup starts at 0, and AdamW's
    # decay is scaled by lr too), so after it the encoder must equal the MAE encoder exactly.
    ft_dir = str(tmp_path / "finetune")
    values = th.overrides(
        total_steps=1, warmup_steps=2, init_from=str(mae_dir), checkpoint_every=1, eval_every=-1
    )
    first = _train("classification", values, ft_dir, return_params=True)
    params = flax.traverse_util.flatten_dict(first["params"], sep="/")
    source = flax.traverse_util.flatten_dict(mae_params, sep="/")
    encoder = [k for k in params if k.startswith(("patch_embed", "pos_embed", "blocks_"))]
    assert len(encoder) == len(
        [k for k in source if k.startswith(("patch_embed", "pos_embed", "blocks_"))]
    )
    for name in encoder:
        np.testing.assert_array_equal(params[name], np.asarray(source[name]), err_msg=name)
    assert "head/kernel" in params and "head/kernel" not in source

    # Continue the same workdir to step 6 (resumes the finetuning checkpoint, not the MAE one).
    values.update(total_steps=6, eval_every=0, export_model=True)
    second = _train("classification", values, ft_dir)
    assert second["resumed_from"] == 1 and second["step"] == 6
    # The exported classifier names its classes as the data does: the digits "0".."9".
    meta = json.load(open(os.path.join(second["model_dir"], "config.json")))
    assert meta["id2label"] == {str(i): str(i) for i in range(10)}
    ev = second["eval"]
    assert set(ev) == {"loss", "top1", "top5"}
    assert 0.0 <= ev["top1"] <= ev["top5"] <= 1.0
    assert ev["top5"] > 0.3  # 5 of 10 classes: chance is 0.5 only for a uniform model


def test_the_exported_model_loads_in_transformers(mae_run):
    """train.py's model/ is transformers' directory: its HieraForPreTraining gives our loss."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import hiera_jax

    model_dir = mae_run[1]["model_dir"]
    assert sorted(os.listdir(model_dir)) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
    theirs = transformers.HieraForPreTraining.from_pretrained(model_dir).eval()
    ours = hiera_jax.HieraForPreTraining.from_pretrained(model_dir)
    rng = np.random.RandomState(0)
    x = rng.randn(2, 1, 32, 32).astype(np.float32)  # the digits: 32x32, one channel
    noise = rng.rand(2, ours.config.num_mask_units).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x), noise=torch.from_numpy(noise))
    out = ours(pixel_values=x, noise=noise)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.loss, ref.loss.numpy(), rtol=1e-4)
    # Its processor normalises as the training data was (mean/std 0.5, one channel).
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    assert list(processor.image_mean) == [0.5] and processor.crop_size == {
        "height": 32,
        "width": 32,
    }


def test_init_from_rejects_a_mismatched_encoder(tmp_path, mae_run):
    mae_dir, _ = mae_run
    values = th.overrides(total_steps=1, init_from=str(mae_dir), model__embed_dim=8)
    with pytest.raises(ValueError, match="does not fit"):
        _train("classification", values, tmp_path / "ft")
    with pytest.raises(FileNotFoundError, match="model directory"):
        values = th.overrides(total_steps=1, init_from=str(tmp_path / "nothing"))
        _train("classification", values, tmp_path / "ft2")


def test_abswin_mae_then_hieradet_finetune(tmp_path):
    """SAM 2's path: MAE of the abs-win Hiera (configs/digits_mae_abswin.py), then SAM 2's
    HieraDet (configs/digits_hieradet_finetune.py) started from its encoder; the exported
    classifier is timm's directory, and timm's `hieradet_sam2` gives its logits."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from helpers.reference import rel_err

    from hiera_jax.weights.hieradet_loading import load_hieradet

    mae_dir = tmp_path / "mae_abswin"
    values = th.overrides(total_steps=3, eval_every=0, export_model=True)
    mae = _train(th.config_file("digits_mae_abswin", {**values, "mesh_shape": (1, 2)}), {}, mae_dir)
    assert mae["step"] == 3 and np.isfinite(mae["eval"]["loss"])
    _, mae_params = load_pretrained(mae["model_dir"])
    assert mae_params["pos_embed"].shape == (1, 4, 4, 16)  # the abs-win tables, trained
    assert mae_params["pos_embed_win"].shape == (1, 2, 2, 16)

    # HieraDet of the same width; step 1 runs at lr 0, so its trunk is the MAE encoder exactly.
    trunk = {"model.embed_dim": 16, "model.num_heads": 1}
    values = {
        **{k: v for k, v in th.TINY.items() if not k.startswith("model.")},
        **trunk,
        "total_steps": 1,
        "warmup_steps": 2,
        "init_from": str(mae_dir),
        "export_model": True,
        "eval_every": 0,
        "mesh_shape": (1, 2),
    }
    config = th.config_file("digits_hieradet_finetune", values)
    first = _train(config, {}, tmp_path / "hieradet", return_params=True)
    params = flax.traverse_util.flatten_dict(first["params"], sep="/")
    source = flax.traverse_util.flatten_dict(mae_params, sep="/")
    renamed = {"pos_embed_window": "pos_embed_win"}
    trunk_keys = [k for k in params if not k.startswith("head/")]
    assert len(trunk_keys) == len(
        [k for k in source if k.startswith(("patch_embed", "pos_embed", "blocks_"))]
    )
    for name in trunk_keys:
        expected = np.asarray(source[renamed.get(name, name)])
        np.testing.assert_array_equal(params[name], expected, err_msg=name)
    assert set(first["eval"]) == {"loss", "top1", "top5"}

    # workdir/model: timm's keys and config.json; timm builds it and gives our logits.
    model, loaded = load_hieradet(first["model_dir"], classifier=True)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, first["params"]))
    meta = json.load(open(os.path.join(first["model_dir"], "config.json")))
    reference = timm.create_model(
        meta["architecture"], num_classes=meta["num_classes"], **meta["model_args"]
    ).eval()
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(os.path.join(first["model_dir"], "model.safetensors")))
    x = np.random.RandomState(0).randn(2, 32, 32, 1).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    ours = jax.jit(model.apply)({"params": loaded}, x)
    assert rel_err(ours, expected) < 1e-4

    # Continuing to step 3 resumes the HieraDet checkpoint; MAE is refused for HieraDet.
    second = _train(th.apply_values(config, {"total_steps": 3}), {}, tmp_path / "hieradet")
    assert second["resumed_from"] == 1 and second["step"] == 3
    with pytest.raises(ValueError, match="trains as a classifier only"):
        _train(th.apply_values(config, {"task": "mae"}), {}, tmp_path / "refused")
    with pytest.raises(ValueError, match="not an option of SAM 2's HieraDet"):
        _train(th.apply_values(config, {"model.mask_ratio": 0.5}), {}, tmp_path / "no")


def test_video_mae_on_moving_digits(tmp_path):
    from configs import moving_digits_mae

    config = moving_digits_mae.get_config()
    values = th.overrides(
        total_steps=2, eval_every=0, num_vis=2, eval_max_examples=8, mesh_shape=(1, 2)
    )
    for key, value in values.items():
        if key.startswith("model.decoder_num_heads"):
            continue
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    summary = _train(config, values, tmp_path)
    assert summary["step"] == 2 and np.isfinite(summary["eval"]["loss"])
    assert os.path.exists(os.path.join(summary["pictures_dir"], "latest.png"))


# ---------------------------------------------------------------------------- pieces
def test_layer_decay_and_weight_decay_groups():
    params = {
        "patch_embed": {"proj": {"kernel": np.zeros((3, 3, 1, 4)), "bias": np.zeros(4)}},
        "pos_embed": np.zeros((1, 4, 4)),
        "blocks_0": {"mlp": {"fc1": {"kernel": np.zeros((4, 8))}}},
        "blocks_1": {"norm1": {"scale": np.zeros(4)}},
        "norm": {"scale": np.zeros(4)},
        "head": {"kernel": np.zeros((4, 10)), "bias": np.zeros(10)},
    }
    scales = flax.traverse_util.flatten_dict(
        optim.layer_scales(params, depth=2, decay=0.5), sep="/"
    )
    assert scales["patch_embed/proj/kernel"] == scales["pos_embed"] == 0.5**3
    assert scales["blocks_0/mlp/fc1/kernel"] == 0.5**2
    assert scales["blocks_1/norm1/scale"] == 0.5
    assert scales["head/kernel"] == scales["norm/scale"] == 1.0
    mask = flax.traverse_util.flatten_dict(optim.decay_mask(params), sep="/")
    assert mask == {
        "patch_embed/proj/kernel": True,
        "patch_embed/proj/bias": False,
        "pos_embed": False,
        "blocks_0/mlp/fc1/kernel": True,
        "blocks_1/norm1/scale": False,
        "norm/scale": False,
        "head/kernel": True,
        "head/bias": False,
    }


def test_schedule_warmup_then_cosine():
    lr = optim.schedule(1.0, total_steps=110, warmup_steps=10, min_lr=0.0)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.5, abs=1e-6)  # cosine midpoint
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-7)
    assert optim.learning_rate(8e-4, 1024, 4096) == pytest.approx(2e-4)


def test_mixup_cutmix_labels_are_distributions():
    cfg = th.make_config("classification").data
    cfg.mixup, cfg.cutmix = 0.8, 1.0
    images = np.random.default_rng(0).normal(size=(8, 32, 32, 1)).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[np.arange(8)]
    for seed in range(6):
        mixed, labels = data_lib.mix_batch(images, onehot, np.random.default_rng(seed), cfg)
        np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
        lam = labels[0, 0]
        assert labels[0, 7] == pytest.approx(1 - lam)  # row 0 mixed with the reversed row 7
        assert mixed.shape == images.shape


def test_randaugment_and_erasing_keep_shapes():
    assert data_lib.parse_randaug("rand-m9-mstd0.5-inc1") == {
        "m": 9.0,
        "mstd": 0.5,
        "n": 2.0,
        "inc": 1.0,
    }
    cfg = th.make_config("classification").data
    cfg.randaug, cfg.reprob = "rand-m9-mstd0.5-inc1", 1.0
    transform = data_lib.Transform(cfg, (32, 32), 1, train=True)
    image = data_lib.DigitsSource("test").load(0, None)[0]
    outs = [transform(image, np.random.default_rng(s)) for s in range(10)]
    assert all(o.shape == (32, 32, 1) and o.dtype == np.float32 for o in outs)
    assert len({o.tobytes() for o in outs}) == 10


def test_folder_source(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    train = data_lib.FolderSource(str(tmp_path), "train")
    val = data_lib.FolderSource(str(tmp_path), "val", classes=train.classes)
    assert len(train) == 6 and train.num_classes == 2 and train.classes == ["cat", "dog"]
    image, label = val.load(4, None)
    assert image.shape == (20, 24, 3) and label == 1
    with pytest.raises(FileNotFoundError, match="not found"):
        data_lib.FolderSource(str(tmp_path), "test")
