"""The model-family registry (`hiera_jax.families`): every name, config and checkpoint finds its
family's record, and a loader that finds another family's tensors hands them over by type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiera_jax
from hiera_jax import families
from hiera_jax.models import hieradet
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.hieradet import HieraDetConfig
from hiera_jax.weights.formats import OtherFamily


def test_every_variant_name_finds_its_family_and_config_type():
    seen = set()
    for name in families.names():
        family = families.get(name)
        for variant in family.variants():
            assert variant not in seen, f"{variant} is in two families"
            seen.add(variant)
            assert families.for_name(variant) is family
            config = family.get_config(variant)
            assert isinstance(config, family.config_type)
            assert families.of_config(config) is family
    assert set(families.all_variants()) == seen
    assert "hiera_tiny_224" in seen and "sam2_hiera_tiny" in seen
    # Unknown names go to Hiera's record, whose errors list the names.
    assert families.for_name("no_such_model").name == families.DEFAULT
    with pytest.raises(ValueError, match="unknown model name"):
        families.for_name("no_such_model").get_config("no_such_model")
    with pytest.raises(TypeError, match="not a model config"):
        families.of_config(object())


def test_sources_are_recognised_by_name_repo_and_directory(tmp_path):
    assert families.for_source("sam2_hiera_tiny.fb_r896").name == "hieradet"
    assert families.for_source("facebook/sam2.1-hiera-tiny").name == "hieradet"
    assert families.for_source("hiera_tiny_224").name == "hiera"
    assert families.for_source("facebook/hiera-tiny-224-in1k-hf").name == "hiera"
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text('{"architecture": "sam2_hiera_tiny"}')
    assert families.for_source(str(timm_dir)).name == "hieradet"
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "hiera"}')
    assert families.for_source(str(hf_dir)).name == "hiera"


def test_dispatch_hands_over_to_the_family_the_loader_names():
    calls = []

    def call(family, path):
        assert path == "model.pt"
        calls.append(family.name)
        if family.name == "hiera":
            raise OtherFamily("these are HieraDet tensors", family="hieradet")
        return family.name

    assert families.dispatch("model.pt", call) == "hieradet"
    assert calls == ["hiera", "hieradet"]

    def refuses(family, path):  # an OtherFamily naming no family, or its own, is the error itself
        raise OtherFamily("not a checkpoint", family=None)

    with pytest.raises(OtherFamily, match="not a checkpoint"):
        families.dispatch("model.pt", refuses)

    def other_error(family, path):
        raise ValueError("broken file")

    with pytest.raises(ValueError, match="broken file"):
        families.dispatch("model.pt", other_error)


def test_records_build_what_create_model_and_training_ask_for():
    tiny = families.get("hieradet").create("sam2_hiera_tiny", input_size=(64, 64))
    assert type(tiny) is hieradet.HieraDet
    classifier = hiera_jax.create_model("sam2_hiera_tiny", num_classes=5, input_size=(64, 64))
    assert type(classifier) is hieradet.HieraDetForImageClassification
    assert isinstance(
        hiera_jax.create_model("hiera_tiny_224"), hiera_jax.HieraForImageClassification
    )
    det = families.get("hieradet")
    with pytest.raises(ValueError, match="trains as a classifier only"):
        det.training_model(det.get_config("sam2_hiera_tiny"), "mae")
    with pytest.raises(ValueError, match="not an option of SAM 2's HieraDet"):
        det.training_config("sam2_hiera_tiny", {"decoder_depth": 2})
    with pytest.raises(ValueError, match="not an option of Hiera"):
        families.get("hiera").training_config("hiera_tiny_224", {"window_spec": (8, 4, 14, 7)})
    assert not det.scannable and families.get("hiera").scannable
    assert families.get("hiera").transformers_classes and not det.transformers_classes
    assert isinstance(det.get_config("sam2_hiera_tiny"), HieraDetConfig)
    assert isinstance(families.get("hiera").get_config("hiera_tiny_224"), HieraConfig)


def test_feature_functions_of_each_family_give_every_stage():
    config = hieradet.get_config("sam2_hiera_tiny", input_size=(64, 64))
    loaded = families.get("hieradet").random_for_inference("sam2_hiera_tiny", input_size=(64, 64))
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    out = jax.jit(families.get("hieradet").features(config, loaded.neck))(loaded.params, x)
    assert [k for k in out if k.startswith("stage")] == ["stage1", "stage2", "stage3", "stage4"]
    assert out["vision_features"].shape[:3] == (1, 4, 4)
    trunk_only = families.get("hieradet").features(config, None)
    maps = jax.jit(trunk_only)(loaded.params["trunk"], x)
    np.testing.assert_array_equal(np.asarray(maps["stage4"]), np.asarray(out["stage4"]))


def test_exported_preprocessing_is_the_runs_evaluation(tmp_path):
    """train.py's model/ says how the run evaluated: short side to size / crop_pct (the digits
    recipes' crop_pct 1.0: 32, not the ImageNet 256/224 rule's 36), then the centre crop."""
    import json

    from hiera_jax.models.factory import build_model, init_params
    from hiera_jax.training.inputs.data import center_crop_box

    config = hiera_jax.get_config(
        "hiera_tiny_224", input_size=(32, 32), in_chans=1, num_classes=10,
        stages=(2, 2), q_pool=1, mask_unit_size=(2, 2), mask_unit_attn=(True, False),
        num_heads=(1, 2),
    )  # fmt: skip
    params = init_params(build_model(config, "classification"), jax.random.key(0))
    for crop_pct, short in ((1.0, 32), (0.875, 37)):
        out = families.get("hiera").export(
            str(tmp_path / str(crop_pct)), params, config, task="classification", name=None,
            mean=(0.5,), std=(0.5,), crop_pct=crop_pct,
        )  # fmt: skip
        with open(f"{out}/preprocessor_config.json") as f:
            processor = json.load(f)
        assert processor["size"] == {"shortest_edge": short}
        assert processor["crop_size"] == {"height": 32, "width": 32}
        # The same crop as the evaluation transform's box (top, left, height, width) on a
        # 48 x 64 image: the whole short side at crop_pct 1.
        _, _, height, width = center_crop_box(48, 64, (32, 32), crop_pct)
        assert abs(48 * 32 / short - min(height, width)) <= 1, (short, height, width)


def test_hieradet_init_from_takes_each_family_s_checkpoints(tmp_path, monkeypatch):
    """HieraDet's `init_from`: a HieraDet finetune's workdir (timm's layout), a SAM 2 `.pt`
    checkpoint (Hiera's loader finds HieraDet tensors and hands them over), and an abs-win
    Hiera's directory (its `pos_embed_win` renamed)."""
    torch = pytest.importorskip("torch")
    from hiera_jax.models.factory import build_model, init_params
    from hiera_jax.weights import hieradet_convert
    from hiera_jax.weights.hieradet_loading import save_hieradet

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    det = families.get("hieradet")
    trunk = hieradet.get_config("sam2_hiera_tiny", input_size=(64, 64))
    params = jax.device_get(init_params(hieradet.HieraDet(trunk), jax.random.key(1)))
    expected = {k: np.asarray(v) for k, v in _flat(params).items()}

    save_hieradet(tmp_path / "run" / "model", params, trunk, architecture="sam2_hiera_tiny")
    got, where = det.encoder_params(str(tmp_path / "run"))
    assert where == str(tmp_path / "run" / "model")
    _assert_same(got, expected)

    state = hieradet_convert.export_state_dict(params, trunk, format="sam2")
    torch.save({"model": {k: torch.tensor(v) for k, v in state.items()}}, tmp_path / "t.pt")
    got, where = det.encoder_params(str(tmp_path / "t.pt"))
    _assert_same(got, expected)

    abswin = hiera_jax.get_config(
        "hiera_small_abswin_256", input_size=(64, 64), stages=(1, 1, 1, 1)
    )
    hiera_params = init_params(build_model(abswin, "backbone"), jax.random.key(2))
    hiera_jax.save_pretrained(str(tmp_path / "abswin"), hiera_params, abswin, model_type="backbone")
    got, _ = det.encoder_params(str(tmp_path / "abswin"))
    source = _flat(jax.device_get(hiera_params))
    assert "pos_embed_window" in got and "pos_embed_win" not in got
    np.testing.assert_array_equal(got["pos_embed_window"], np.asarray(source["pos_embed_win"]))


def _flat(tree):
    import flax

    return flax.traverse_util.flatten_dict(tree, sep="/")


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
