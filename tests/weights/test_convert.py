"""Weight conversion: official, timm and Hugging Face formats, the CLI, export, and errors."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from helpers.reference import official_model, random_input, rel_err, to_torch

import hiera_jax
from hiera_jax.models.factory import init_params

pytestmark = pytest.mark.reference
TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "convert", "convert_pytorch.py")


def _randomise_norms(model):
    """Random LayerNorm affine and no all-zero tensor (timm zero-inits its head), so parity bites."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.02)
    return model


def _run_cli(*args, block_torch=False):
    code = "import runpy, sys\n"
    if block_torch:
        code += "sys.modules['torch'] = None  # any import of torch now fails\n"
    code += f"sys.argv = {[CLI, *args]!r}\nrunpy.run_path({CLI!r}, run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def _logits(model, params, x):
    return np.asarray(jax.jit(model.apply)({"params": params}, x))


@pytest.fixture(scope="module")
def tiny_official():
    return official_model("hiera_tiny_224")


@pytest.fixture(scope="module")
def image():
    return random_input((2, 224, 224, 3), seed=10)


def test_timm_checkpoint(image, record_parity):
    import timm

    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model("hiera_tiny_224", pretrained=False).eval())
    sd = model.state_dict()
    assert "head.fc.weight" in sd and "head.norm.weight" in sd
    params = hiera_jax.convert_state_dict(sd, "hiera_tiny_224", source="timm")
    auto = hiera_jax.convert_state_dict(sd, "hiera_tiny_224", source="auto")
    jax.tree.map(np.testing.assert_array_equal, params, auto)
    with torch.no_grad():
        expected = model(to_torch(image)).numpy()
    ours = _logits(hiera_jax.create_model("hiera_tiny_224"), params, image)
    assert record_parity("hiera_tiny_224", "timm", "logits", rel_err(ours, expected)) < TOL


def _hf_config(**kw):
    from transformers import HieraConfig

    return HieraConfig(embed_dim=96, depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8], **kw)


def test_hugging_face_classifier_directory_converts_without_torch(tmp_path, image, record_parity):
    from transformers import HieraForImageClassification

    torch.manual_seed(1)
    hf = _randomise_norms(HieraForImageClassification(_hf_config(num_labels=1000)).eval())
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    with torch.no_grad():
        expected = hf(to_torch(image)).logits.numpy()

    result = _run_cli(
        "--model",
        "hiera_tiny_224",
        "--input",
        str(tmp_path / "hf"),
        "--output",
        str(tmp_path / "out"),
        block_torch=True,
    )
    assert result.returncode == 0, result.stderr
    assert "hf format" in result.stdout
    model, params = hiera_jax.load_pretrained(str(tmp_path / "out"))
    err = rel_err(_logits(model, params, image), expected)
    assert record_parity("hiera_tiny_224", "Hugging Face dir (CLI, no torch)", "logits", err) < TOL

    # The directory's config.json is checked against the requested architecture.
    result = _run_cli(
        "--model",
        "hiera_small_224",
        "--input",
        str(tmp_path / "hf"),
        "--output",
        str(tmp_path / "x"),
    )
    assert (
        result.returncode == 2
        and "depths: checkpoint [1, 2, 7, 2] vs model [1, 2, 11, 2]" in result.stderr
    )


def test_hugging_face_pretraining_model(image, record_parity):
    from transformers import HieraForPreTraining

    torch.manual_seed(2)
    cfg = _hf_config(
        decoder_hidden_size=512, decoder_depth=8, decoder_num_heads=16, num_query_pool=2
    )
    hf = _randomise_norms(HieraForPreTraining(cfg).eval())
    params = hiera_jax.convert_state_dict(hf.state_dict(), "mae_hiera_tiny_224", source="hf")
    noise = torch.rand(2, 49)
    with torch.no_grad():
        out = hf(to_torch(image), noise=noise)
    keep = np.argsort(np.argsort(noise.numpy(), 1), 1) < 19  # HF keeps the lowest noise
    model = hiera_jax.create_model("mae_hiera_tiny_224")
    loss, pred, _, _ = jax.jit(model.apply)({"params": params}, image, mask=keep)
    visible = out.bool_masked_pos.numpy()  # at prediction resolution, True = visible
    err = rel_err(pred, out.logits.numpy()[~visible])
    assert record_parity("mae_hiera_tiny_224", "Hugging Face", "pred", err) < TOL
    err = rel_err(loss, out.loss.numpy())
    assert record_parity("mae_hiera_tiny_224", "Hugging Face", "loss", err) < TOL


def test_official_pth_through_the_cli(tmp_path, tiny_official, image, record_parity):
    path = tmp_path / "hiera_tiny_224.pth"
    torch.save({"model_state": tiny_official.state_dict()}, path)
    result = _run_cli(
        "--model", "hiera_tiny_224", "--input", str(path), "--output", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    assert "official format" in result.stdout
    model, params = hiera_jax.load_pretrained(str(tmp_path / "out"))
    assert isinstance(model, hiera_jax.HieraForImageClassification)
    with torch.no_grad():
        expected = tiny_official(to_torch(image)).numpy()
    err = rel_err(_logits(model, params, image), expected)
    assert record_parity("hiera_tiny_224", "official .pth (CLI)", "logits", err) < TOL


@pytest.mark.parametrize("name", ["hiera_tiny_224", "mae_hiera_tiny_224"])
def test_export_state_dict_runs_in_the_official_model(name, image, record_parity):
    """Params made here (random JAX init) load strictly into official PyTorch and agree."""
    model = hiera_jax.create_model(name)
    params = init_params(model, jax.random.key(7))
    exported = hiera_jax.export_state_dict(params, name)
    official = official_model(name)
    official.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    if name.startswith("mae_"):
        torch.manual_seed(0)
        mask = official.get_random_mask(to_torch(image), 0.6)
        with torch.no_grad():
            loss, pred, _, _ = official(to_torch(image), mask=mask)
        our_loss, our_pred, _, _ = jax.jit(model.apply)(
            {"params": params}, image, mask=mask.numpy()
        )
        err = rel_err(our_pred, pred.numpy())
        assert record_parity(name, "exported to official", "pred", err) < TOL
        assert (
            record_parity(name, "exported to official", "loss", rel_err(our_loss, loss.numpy()))
            < TOL
        )
    else:
        with torch.no_grad():
            expected = official(to_torch(image)).numpy()
        err = rel_err(_logits(model, params, image), expected)
        assert record_parity(name, "exported to official", "logits", err) < TOL
    # And back again: convert(export(params)) is the identity.
    again = hiera_jax.convert_state_dict(exported, name)
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))


def test_conversion_errors_name_the_keys(tiny_official):
    sd = dict(tiny_official.state_dict())
    with pytest.raises(ValueError, match=r"has no place for: extra\.weight"):
        hiera_jax.convert_state_dict({**sd, "extra.weight": torch.zeros(3)}, "hiera_tiny_224")
    missing = {k: v for k, v in sd.items() if k != "blocks.3.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"does not fill: blocks_3/attn/qkv/kernel"):
        hiera_jax.convert_state_dict(missing, "hiera_tiny_224")
    with pytest.raises(
        ValueError,
        match=r"head\.projection\.weight -> head/kernel: checkpoint \(768, 1000\).*\(768, 10\)",
    ):
        hiera_jax.convert_state_dict(
            sd,
            "hiera_tiny_224",
        ) if False else hiera_jax.convert_state_dict(
            sd, hiera_jax.get_config("hiera_tiny_224", num_classes=10)
        )
    with pytest.raises(ValueError, match=r"does not fill: .*blocks_11"):
        hiera_jax.convert_state_dict(sd, "hiera_small_224")
    with pytest.raises(ValueError, match="source must be one of"):
        hiera_jax.convert_state_dict(sd, "hiera_tiny_224", source="onnx")
    with pytest.raises(ValueError, match="params do not fit"):
        hiera_jax.export_state_dict({"pos_embed": np.zeros((1, 3136, 96))}, "hiera_tiny_224")


def test_cli_and_loader_report_missing_and_corrupt_files(tmp_path, tiny_official):
    result = _run_cli(
        "--model",
        "hiera_tiny_224",
        "--input",
        str(tmp_path / "nope.pth"),
        "--output",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "checkpoint not found" in result.stderr

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(1000))
    result = _run_cli(
        "--model", "hiera_tiny_224", "--input", str(corrupt), "--output", str(tmp_path / "o")
    )
    assert (
        result.returncode == 2 and "cannot read" in result.stderr and "corrupt.pth" in result.stderr
    )

    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = _run_cli(
        "--model", "hiera_tiny_224", "--input", str(bad_st), "--output", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "cannot read" in result.stderr

    result = _run_cli(
        "--model", "hiera_nano", "--input", str(bad_st), "--output", str(tmp_path / "o")
    )
    assert result.returncode != 0 and "unknown model name 'hiera_nano'" in result.stderr

    with pytest.raises(FileNotFoundError, match="not a hiera-jax model directory"):
        hiera_jax.load_pretrained(str(tmp_path / "missing"))

    # A saved model whose config no longer fits its parameters is refused, naming the keys.
    params = hiera_jax.convert_state_dict(tiny_official.state_dict(), "hiera_tiny_224")
    cfg = hiera_jax.get_config("hiera_tiny_224")
    out = hiera_jax.save_pretrained(
        str(tmp_path / "saved"), params, cfg, model_type="classification"
    )
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hiera_jax.save_pretrained(str(tmp_path / "wrong"), params, cfg, model_type="classification")
    import json

    meta = json.loads((tmp_path / "wrong" / "config.json").read_text())
    meta["id2label"] = {str(i): f"c{i}" for i in range(10)}
    del meta["label2id"]
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"classifier\.weight -> head/kernel: checkpoint \(768, 1000\)"
    ):
        hiera_jax.load_pretrained(str(tmp_path / "wrong"))

    # Truncate the saved weights: the loader must refuse, not return garbage.
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        hiera_jax.load_pretrained(out)


def test_directories_of_the_earlier_format_still_load(tmp_path, tiny_official, image):
    """`{"format": "hiera-jax", ...}` + orbax `params/` (what save_pretrained wrote before it
    wrote transformers' directories), made here with orbax directly, as that writer did."""
    import json

    import orbax.checkpoint as ocp

    params = hiera_jax.convert_state_dict(tiny_official.state_dict(), "hiera_tiny_224")
    old = tmp_path / "old"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(old / "params"), params, force=True)
        checkpointer.wait_until_finished()
    official_fields = {  # the official names, heads as one int and head_mul, as it stored them
        "input_size": [224, 224], "in_chans": 3, "embed_dim": 96, "num_heads": 1,
        "head_mul": 2.0, "num_classes": 1000, "stages": [1, 2, 7, 2], "q_pool": 3,
        "mask_unit_attn": [True, True, False, False], "dim_mul": 2.0, "dtype": "float32",
    }  # fmt: skip
    meta = {
        "format": "hiera-jax",
        "model_type": "classification",
        "name": "hiera_tiny_224",
        "config": official_fields,
        "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    (old / "config.json").write_text(json.dumps(meta))
    model, loaded = hiera_jax.load_pretrained(str(old))
    assert isinstance(model, hiera_jax.HieraForImageClassification)
    assert model.config == hiera_jax.get_config("hiera_tiny_224")
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
    with torch.no_grad():
        expected = tiny_official(to_torch(image)).numpy()
    assert rel_err(_logits(model, loaded, image), expected) < TOL
    processor = hiera_jax.HieraImageProcessor.from_pretrained(str(old))  # its stored mean/std
    assert processor.image_mean == [0.5, 0.5, 0.5] and processor.image_std == [0.25, 0.25, 0.25]
    # Saved again, it is transformers' directory.
    model.save_pretrained(str(tmp_path / "new"), params=loaded)
    assert sorted(os.listdir(tmp_path / "new")) == ["config.json", "model.safetensors"]


def test_models_transformers_cannot_express_save_with_the_official_keys(tmp_path):
    """A video model: config.json + model_official.safetensors, which the official model loads
    strictly and our loaders read back; transformers finds no model.safetensors to misread."""
    from safetensors.torch import load_file

    kwargs = dict(input_size=(8, 64, 64))
    official = official_model("hiera_base_16x224", **kwargs)
    config = hiera_jax.get_config("hiera_base_16x224", **kwargs)
    params = hiera_jax.convert_state_dict(official.state_dict(), config)
    assert "transformers has no video Hiera" in config.is_transformers_compatible()
    out = hiera_jax.save_pretrained(
        str(tmp_path / "video"), params, config, model_type="classification"
    )
    assert sorted(os.listdir(out)) == ["config.json", "model_official.safetensors"]
    fresh = official_model("hiera_base_16x224", seed=1, **kwargs)
    fresh.load_state_dict(load_file(os.path.join(out, "model_official.safetensors")), strict=True)
    x = random_input((1, 8, 64, 64, 3), seed=11)
    with torch.no_grad():
        expected = official(to_torch(x)).numpy()
        again = fresh(to_torch(x)).numpy()
    np.testing.assert_array_equal(again, expected)
    model, loaded = hiera_jax.load_pretrained(out)
    assert model.config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
    from transformers import HieraForImageClassification

    with pytest.raises(OSError, match="model.safetensors"):
        HieraForImageClassification.from_pretrained(out)


def test_a_model_directory_converts_with_its_preprocessing(tmp_path):
    """train.py's `model/` (1-channel digits, mean/std 0.5) through the converter keeps its
    preprocessor_config.json, so `predict` on the output normalises as the run did."""
    from hiera_jax import inference

    config = hiera_jax.get_config("hiera_tiny_224", in_chans=1, input_size=(64, 64), num_classes=3)
    params = hiera_jax.init_params(
        hiera_jax.models.hiera.HieraForImageClassification(config), jax.random.key(0)
    )
    source = hiera_jax.save_pretrained(
        str(tmp_path / "model"), params, config, model_type="classification",
        preprocessing={"mean": (0.5,), "std": (0.5,)},
    )  # fmt: skip
    run = _run_cli("--input", source, "--output", str(tmp_path / "ckpt"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "with its preprocessor_config.json" in run.stdout
    with open(os.path.join(source, "preprocessor_config.json")) as f:
        expected = f.read()
    with open(tmp_path / "ckpt" / "preprocessor_config.json") as f:
        assert f.read() == expected
    predictor = inference.Predictor.from_pretrained(str(tmp_path / "ckpt"))
    assert predictor.mean == (0.5,) and predictor.std == (0.5,)
    probs = predictor.predict([np.zeros((64, 64), np.uint8)])
    np.testing.assert_allclose(
        probs, inference.Predictor.from_pretrained(source).predict([np.zeros((64, 64), np.uint8)])
    )
