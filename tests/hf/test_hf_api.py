"""The Hugging Face Hiera API, call for call, against transformers 5.23 on random weights.

Each transformers model is built with random weights (and random LayerNorm affines, so a swapped
scale or bias cannot hide), saved with its own `save_pretrained`, and loaded here through our
`from_pretrained` of that directory or of an offline hub cache holding it; both are then called
the same way on the same NCHW pixels and compared in float32 (rel err < 1e-4). The other way, our
models are saved with `save_pretrained` and loaded by transformers.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers.hub import write_hf_cache
from helpers.reference import randomise_norms, rel_err

import hiera_jax
from hiera_jax import HieraConfig

pytestmark = pytest.mark.reference
TOL = 1e-4
# transformers' tiny Hiera at 64x64: 16x16 tokens, 2x2 mask units of 8x8 tokens.
TINY = dict(embed_dim=96, depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8], image_size=[64, 64])
MAE = dict(TINY, num_query_pool=2, decoder_hidden_size=64, decoder_depth=2, decoder_num_heads=4)
LABELS = [f"class {i}" for i in range(10)]
ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]


def _np(value):
    return value.detach().numpy() if hasattr(value, "detach") else np.asarray(value)


def _close(ours, theirs, what, record_parity=None, label="tiny @64"):
    err = rel_err(_np(ours), _np(theirs))
    if record_parity is not None:
        record_parity(label, "transformers", what, err)
    assert err < TOL, (what, err)
    return err


def _close_all(ours, theirs, what, record_parity=None):
    assert len(ours) == len(theirs), (what, len(ours), len(theirs))
    worst = max(rel_err(_np(a), _np(b)) for a, b in zip(ours, theirs))
    if record_parity is not None:
        record_parity("tiny @64", "transformers", what, worst)
    assert worst < TOL, (what, worst)


@pytest.fixture(scope="module")
def pixels():
    return np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{class name: (transformers model in eval mode, the directory it saved itself into)}."""
    root = tmp_path_factory.mktemp("transformers")
    torch.manual_seed(0)
    models = {
        "HieraModel": transformers.HieraModel(transformers.HieraConfig(**TINY)),
        "HieraForImageClassification": transformers.HieraForImageClassification(
            transformers.HieraConfig(**TINY, id2label=dict(enumerate(LABELS)))
        ),
        "HieraForPreTraining": transformers.HieraForPreTraining(transformers.HieraConfig(**MAE)),
        "HieraBackbone": transformers.HieraBackbone(
            transformers.HieraConfig(**TINY, out_features=ALL_STAGES)
        ),
    }
    out = {}
    for name, model in models.items():
        model = randomise_norms(model.eval())
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """An offline HF_HOME that both huggingface_hub (for transformers) and our loaders read."""
    import huggingface_hub.constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HIERA_JAX_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


# ---------------------------------------------------------------------- HieraConfig
def test_config_takes_both_vocabularies_into_one_form():
    hf_words = HieraConfig(
        depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8], num_query_pool=2, embed_dim_multiplier=2.0
    )
    official = HieraConfig(stages=(1, 2, 7, 2), num_heads=1, head_mul=2.0, q_pool=2)
    # The variant names its 1000 classes and the official decoder; the bare configs leave both
    # to transformers' defaults (2 labels, no decoder size).
    variant = hiera_jax.get_config("mae_hiera_tiny_224")
    assert (variant.num_classes, variant.decoder_embed_dim) == (1000, 512)
    bare = dict(num_classes=2, decoder_embed_dim=None, decoder_depth=None, decoder_num_heads=None)
    assert hf_words == official == variant.replace(**bare)
    assert hash(hf_words) == hash(official)
    assert (hf_words.depths, hf_words.num_query_pool, hf_words.stages) == (
        [1, 2, 7, 2],
        2,
        (1, 2, 7, 2),
    )
    # Per-stage heads that do not double, and every transformers argument, are expressible.
    odd = HieraConfig(num_heads=[1, 3, 4, 6], layer_norm_eps=1e-5, normalize_pixel_loss=False)
    assert [odd.block_specs[end].heads for end in odd.stage_ends] == [1, 3, 4, 6]
    theirs = transformers.HieraConfig(num_heads=[1, 3, 4, 6], layer_norm_eps=1e-5,
                                      normalize_pixel_loss=False, num_labels=5)  # fmt: skip
    ours = HieraConfig.from_dict(json.loads(theirs.to_json_string()))
    assert ours.replace(num_classes=5) == odd.replace(num_classes=5) and ours.num_labels == 5
    # to_dict writes transformers' keys with transformers' values.
    expected = theirs.to_dict()
    written = ours.to_dict()
    for key in ("embed_dim", "image_size", "depths", "num_heads", "num_query_pool", "mlp_ratio",
                "masked_unit_attention", "layer_norm_eps", "hidden_size", "stage_names",
                "out_features", "out_indices", "normalize_pixel_loss", "id2label"):  # fmt: skip
        assert json.loads(json.dumps(written[key])) == json.loads(json.dumps(expected[key])), key


def test_config_json_reads_both_ways(tmp_path):
    config = HieraConfig(depths=[1, 1, 3, 1], embed_dim=48, num_heads=[1, 2, 3, 6], mlp_ratio=2.0,
                         id2label={0: "cat", 1: "dog"}, out_indices=[2, 4])  # fmt: skip
    config.save_pretrained(tmp_path)
    theirs = transformers.HieraConfig.from_pretrained(tmp_path)
    assert (theirs.depths, theirs.num_heads, theirs.mlp_ratio) == ([1, 1, 3, 1], [1, 2, 3, 6], 2.0)
    assert theirs.id2label == {0: "cat", 1: "dog"} and theirs.out_features == ["stage2", "stage4"]
    assert HieraConfig.from_pretrained(tmp_path) == config
    assert HieraConfig.from_pretrained(tmp_path, mlp_ratio=3.0).mlp_ratio == 3.0
    # A file transformers wrote: no id2label means transformers' 2 labels.
    transformers.HieraConfig(depths=[1, 1, 3, 1]).save_pretrained(tmp_path / "theirs")
    assert (
        HieraConfig.from_dict(
            json.loads((tmp_path / "theirs" / "config.json").read_text())
        ).num_labels
        == 2
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_query_pol=2), r"unknown HieraConfig field.*'num_query_pol' \(did you mean 'num_query_pool'\?\)"),
        (dict(hidden_act="relu6"), "hidden_act='relu6' is not supported"),
        (dict(depths=[1, 1, 1, 1], stages=(2, 2, 2, 2)), "the same HieraConfig field"),
        (dict(num_labels=3, id2label={0: "a"}), "num_labels/num_classes=3 but id2label names 1"),
        (dict(out_features=["stage9"]), r"out_features \['stage9'\] are not stage names"),
        (dict(out_features=["stage1"], out_indices=[2]), "name different stages"),
        (dict(num_heads=[1, 2]), "num_heads .* has 2 entries but there are 4 stages"),
        (dict(model_type="vit"), "model_type must be 'hiera'"),
    ],
)  # fmt: skip
def test_config_refuses_what_it_cannot_honour(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HieraConfig(**kwargs)


def test_a_checkpoint_config_json_decides_and_the_block_rules_are_kept_apart():
    # transformers shrinks windows per stage, pooled or not; with one pool its stage-3 windows
    # are 4 tokens where the official code's are 16. Each vocabulary keeps its rule.
    theirs = hiera_jax.get_config("hiera_tiny_224", num_query_pool=1)
    official = hiera_jax.get_config("hiera_tiny_224", q_pool=1)
    assert (theirs.block_rule, official.block_rule) == ("transformers", "official")
    assert theirs.block_specs[3].window_size == 4 and official.block_specs[3].window_size == 16
    assert theirs.is_transformers_compatible() is None
    assert "differently" in official.is_transformers_compatible()
    # Where the rules agree (every published model), one form: equal configs.
    assert hiera_jax.get_config("hiera_tiny_224", num_query_pool=2) == hiera_jax.get_config(
        "hiera_tiny_224", q_pool=2
    )


# ---------------------------------------------------------------------- the four classes
def test_model_classes_match_transformers(saved, pixels, record_parity):
    x = torch.from_numpy(pixels)
    hf, path = saved["HieraModel"]
    model = hiera_jax.HieraModel.from_pretrained(path)
    assert model.config == HieraConfig.from_pretrained(path)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True, output_attentions=True)
    out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    assert out.keys() == list(ref.keys())
    _close(
        out.last_hidden_state, ref.last_hidden_state, "HieraModel last_hidden_state", record_parity
    )
    _close(out.pooler_output, ref.pooler_output, "HieraModel pooler_output", record_parity)
    _close_all(out.hidden_states, ref.hidden_states, "HieraModel hidden_states", record_parity)
    _close_all(out.reshaped_hidden_states, ref.reshaped_hidden_states, "reshaped_hidden_states")
    _close_all(out.attentions, ref.attentions, "HieraModel attentions", record_parity)
    # Indexed and as a tuple, as transformers' ModelOutput.
    _close(out[0], ref[0], "out[0]")
    assert len(model(pixels, return_dict=False)) == 2 == len(hf(x, return_dict=False))
    assert model.config.hidden_size == hf.config.hidden_size == 768

    hf, path = saved["HieraForImageClassification"]
    model = hiera_jax.HieraForImageClassification.from_pretrained(path)
    assert model.config.id2label == hf.config.id2label
    labels = np.array([3, 7])
    with torch.no_grad():
        ref = hf(x, labels=torch.from_numpy(labels), output_hidden_states=True)
    out = model(pixel_values=pixels, labels=labels, output_hidden_states=True)
    _close(out.logits, ref.logits, "HieraForImageClassification logits", record_parity)
    _close(out.loss, ref.loss, "HieraForImageClassification loss (labels)", record_parity)
    _close_all(out.reshaped_hidden_states, ref.reshaped_hidden_states, "classifier states")
    predicted = int(out.logits.argmax(-1)[0])
    assert model.config.id2label[predicted] == hf.config.id2label[int(ref.logits.argmax(-1)[0])]

    hf, path = saved["HieraBackbone"]
    model = hiera_jax.HieraBackbone.from_pretrained(path)
    assert model.out_features == ALL_STAGES and model.channels == hf.channels
    out = model(pixels)
    assert [tuple(m.shape) for m in out.feature_maps] == [
        (2, 96, 16, 16), (2, 96, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4), (2, 768, 2, 2)
    ]  # fmt: skip
    # transformers' HieraBackbone skips the unroll (not Hiera): the reference is transformers'
    # HieraModel on the same weights, its rerolled stage maps through the backbone's norms.
    base = transformers.HieraModel(hf.config, add_pooling_layer=False).eval()
    base.load_state_dict(
        {k: v for k, v in hf.state_dict().items() if not k.startswith("hidden_states_norms")}
    )
    with torch.no_grad():
        maps = base(x, output_hidden_states=True).reshaped_hidden_states
        expected = [
            hf.hidden_states_norms[s](m).permute(0, 3, 1, 2) for s, m in zip(ALL_STAGES, maps)
        ]
        theirs = hf(x).feature_maps
    _close_all(
        out.feature_maps, expected, "HieraBackbone maps (HieraModel maps + norms)", record_parity
    )
    assert min(rel_err(_np(a), _np(b)) for a, b in zip(out.feature_maps, theirs)) > 0.1


def test_mae_with_noise_matches_transformers(saved, pixels, record_parity):
    hf, path = saved["HieraForPreTraining"]
    model = hiera_jax.HieraForPreTraining.from_pretrained(path)
    noise = np.random.RandomState(1).rand(2, 4).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels), noise=torch.from_numpy(noise), output_hidden_states=True)
    out = model(pixels, noise=noise, output_hidden_states=True)
    assert out.logits.shape == ref.logits.shape == (2, 16, 768)  # every token, 16x16x3 pixels
    np.testing.assert_array_equal(out.bool_masked_pos, ref.bool_masked_pos.numpy())
    np.testing.assert_array_equal(out.ids_restore, ref.ids_restore.numpy())
    _close(out.logits, ref.logits, "HieraForPreTraining logits (noise)", record_parity)
    _close(out.loss, ref.loss, "HieraForPreTraining loss (noise)", record_parity)
    _close_all(
        out.hidden_states, ref.hidden_states, "HieraForPreTraining hidden_states", record_parity
    )
    # Without noise each call draws its own mask, as transformers' torch.rand does.
    first, second = model(pixels), model(pixels)
    assert first.logits.shape == (2, 16, 768)
    assert not np.array_equal(first.ids_restore, second.ids_restore) or not np.array_equal(
        first.loss, second.loss
    )


def test_hiera_model_in_mae_mode_masks_as_transformers(saved, pixels, record_parity):
    hf, path = saved["HieraModel"]
    theirs = transformers.HieraModel.from_pretrained(path, is_mae=True).eval()
    ours = hiera_jax.HieraModel.from_pretrained(path, is_mae=True)
    noise = np.random.RandomState(8).rand(2, 4).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(pixels), noise=torch.from_numpy(noise))
    out = ours(pixels, noise=noise)
    np.testing.assert_array_equal(out.bool_masked_pos, ref.bool_masked_pos.numpy())
    np.testing.assert_array_equal(out.ids_restore, ref.ids_restore.numpy())
    _close(
        out.last_hidden_state,
        ref.last_hidden_state,
        "HieraModel is_mae last_hidden_state",
        record_parity,
    )
    _close(out.pooler_output, ref.pooler_output, "HieraModel is_mae pooler_output", record_parity)


def test_interpolate_pos_encoding_at_another_size(saved, record_parity):
    x = np.random.RandomState(2).randn(2, 3, 96, 96).astype(np.float32)
    for name in ("HieraModel", "HieraForImageClassification"):
        hf, path = saved[name]
        model = getattr(hiera_jax, name).from_pretrained(path)
        with torch.no_grad():
            ref = hf(torch.from_numpy(x), interpolate_pos_encoding=True)
        out = model(pixel_values=x, interpolate_pos_encoding=True)
        _close(out[0], ref[0], f"{name} @96 interpolate_pos_encoding", record_parity)
        with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
            model(pixel_values=x)


@pytest.mark.parametrize(
    "extra",
    [
        dict(num_heads=[1, 3, 4, 6]),
        dict(num_query_pool=1),
        dict(mlp_ratio=2.0, hidden_act="gelu_new"),
        dict(embed_dim=32, depths=[1, 1, 1, 1], image_size=[256, 256]),
    ],
    ids=["per-stage heads", "num_query_pool=1", "mlp_ratio=2", "image_size=256"],
)
def test_configs_outside_the_registry_build_from_config_json(extra, tmp_path, record_parity):
    kwargs = {**TINY, **extra}
    torch.manual_seed(3)
    hf = randomise_norms(transformers.HieraModel(transformers.HieraConfig(**kwargs)).eval())
    hf.save_pretrained(tmp_path)
    model = hiera_jax.HieraModel.from_pretrained(tmp_path)
    size = kwargs["image_size"]
    x = np.random.RandomState(4).randn(1, 3, *size).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x))
    _close(model(x).last_hidden_state, ref.last_hidden_state, f"HieraModel {extra}", record_parity)
    _close(model(x).pooler_output, ref.pooler_output, "pooler_output")


# ---------------------------------------------------------------------- loading and saving
def test_from_pretrained_of_an_offline_hub_cache(saved, pixels, hub_home):
    hf, path = saved["HieraForPreTraining"]
    write_hf_cache(hub_home, "facebook/hiera-tiny-224-mae-hf", path)
    model = hiera_jax.HieraForPreTraining.from_pretrained("facebook/hiera-tiny-224-mae-hf")
    theirs = transformers.HieraForPreTraining.from_pretrained("facebook/hiera-tiny-224-mae-hf")
    noise = np.random.RandomState(5).rand(2, 4).astype(np.float32)
    with torch.no_grad():
        ref = theirs.eval()(torch.from_numpy(pixels), noise=torch.from_numpy(noise))
    _close(model(pixels, noise=noise).loss, ref.loss, "hub cache MAE loss")
    # An MAE repo asked for as the encoder: its encoder weights, and a new pooler norm (with a
    # warning, as transformers warns).
    with pytest.warns(UserWarning, match="newly initialised: norm/bias, norm/scale"):
        encoder = hiera_jax.HieraModel.from_pretrained("facebook/hiera-tiny-224-mae-hf")
    assert encoder.config.q_pool == 2 and "decoder_pred" not in encoder.params


def test_save_pretrained_loads_in_transformers(saved, tmp_path, pixels, record_parity):
    """Each class saved here is loaded by transformers' class of the same name, which then
    computes what ours does (the weights are transformers' random ones, moved through ours and
    perturbed here, so the file is ours and not a copy of theirs)."""
    x = torch.from_numpy(pixels)
    noise = np.random.RandomState(6).rand(2, 4).astype(np.float32)
    for name, (_, path) in saved.items():
        ours = getattr(hiera_jax, name).from_pretrained(path)
        ours.params = jax.tree.map(lambda p: p * 1.01 + 0.001, ours.params)
        ours.save_pretrained(tmp_path / name)
        assert sorted(os.listdir(tmp_path / name)) == ["config.json", "model.safetensors"]
        theirs = getattr(transformers, name).from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            if name == "HieraForPreTraining":
                ref = theirs(x, noise=torch.from_numpy(noise)).logits
                got = ours(pixels, noise=noise).logits
            elif name == "HieraBackbone":  # transformers' maps are not Hiera's: compare weights
                ref = theirs.hidden_states_norms["stage3"].weight
                got = ours.params["hidden_states_norms"]["stage3"]["scale"]
                assert theirs.out_features == ours.out_features == ALL_STAGES
            else:
                ref, got = theirs(x)[0], ours(pixels)[0]
        _close(got, ref, f"{name} saved here, loaded by transformers", record_parity)
        # And back: our loaders read the directory into the same parameters.
        again = getattr(hiera_jax, name).from_pretrained(tmp_path / name)
        jax.tree.map(np.testing.assert_array_equal, again.params, ours.params)


def test_push_to_hub_uploads_the_saved_directory(saved, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        calls["files"] = sorted(os.listdir(folder_path))
        if "config.json" in calls["files"]:
            with open(os.path.join(folder_path, "config.json")) as f:
                calls["config"] = json.load(f)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = hiera_jax.HieraForImageClassification.from_pretrained(
        saved["HieraForImageClassification"][1]
    )
    assert model.push_to_hub("me/hiera-test", private=True) == "commit-info"
    assert calls["create"] == (
        "me/hiera-test",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls["upload"][0] == "me/hiera-test"
    assert calls["files"] == ["config.json", "model.safetensors"]
    assert calls["config"]["architectures"] == ["HieraForImageClassification"]
    processor = hiera_jax.HieraImageProcessor()
    processor.push_to_hub("me/hiera-test")
    assert calls["files"] == ["preprocessor_config.json"]


# ---------------------------------------------------------------------- processor
def test_image_processor_matches_transformers(tmp_path):
    from PIL import Image

    kwargs = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                  size={"shortest_edge": 256})  # fmt: skip
    theirs_pil = transformers.BitImageProcessorPil(**kwargs)
    theirs = transformers.BitImageProcessor(**kwargs)  # transformers 5's default (torchvision)
    theirs_pil.save_pretrained(tmp_path)
    ours = hiera_jax.HieraImageProcessor.from_pretrained(tmp_path)
    rng = np.random.RandomState(7)
    images = [
        Image.fromarray(rng.randint(0, 256, (300, 451, 3), np.uint8)),
        Image.fromarray(rng.randint(0, 256, (257, 240, 3), np.uint8)).convert("L"),
        rng.randint(0, 256, (180, 203, 3), np.uint8),  # smaller than the crop after resizing
        rng.randint(0, 256, (3, 333, 333), np.uint8),  # channels-first, as transformers infers
    ]
    std = np.asarray(kwargs["image_std"])[:, None, None]
    for image in images:
        got = ours(images=image, return_tensors="np")["pixel_values"]
        assert got.shape == (1, 3, 224, 224) and got.dtype == np.float32
        pil = theirs_pil(images=image, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(got[0] * std, pil[0] * std, atol=1e-6)  # the same PIL steps
        fast = theirs(images=image, return_tensors="pt")["pixel_values"].numpy()
        diff = np.abs((got[0] - fast[0]) * std)  # torchvision's resize: a pixel level, rarely two
        assert diff.max() <= 2.001 / 255 and diff.mean() < 0.05 / 255
    batch = ours(images=images[:2], return_tensors="jax")
    assert batch.pixel_values.shape == (2, 3, 224, 224) and isinstance(
        batch.pixel_values, jax.Array
    )
    assert len(ours(images=images[:2])["pixel_values"]) == 2  # return_tensors=None: a list
    with pytest.raises(ValueError, match="return_tensors must be 'np', 'jax' or None"):
        ours(images=images[0], return_tensors="pt")
    # transformers reads ours.
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoImageProcessor.from_pretrained(tmp_path / "ours")
    assert back.size == {"shortest_edge": 256} and back.crop_size == {"height": 224, "width": 224}


def test_predictor_preprocesses_as_the_directory_processor(saved, tmp_path):
    import shutil

    from PIL import Image

    from hiera_jax import inference

    model_dir = tmp_path / "model"
    shutil.copytree(saved["HieraForImageClassification"][1], model_dir)
    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64},
        image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4],
    )  # fmt: skip
    processor.save_pretrained(model_dir)
    image = Image.fromarray(np.random.RandomState(9).randint(0, 256, (95, 131, 3), np.uint8))
    predictor = inference.Predictor.from_pretrained(str(model_dir))
    assert predictor.mean == (0.5, 0.4, 0.3)
    ours = hiera_jax.HieraImageProcessor.from_pretrained(model_dir)(image, return_tensors="np")
    np.testing.assert_array_equal(
        predictor.preprocess([image]), ours["pixel_values"].transpose(0, 2, 3, 1)
    )
    theirs = processor(image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours["pixel_values"], theirs, atol=1.01 / 255 / 0.2)


# ---------------------------------------------------------------------- calls, errors
def test_calls_jit_once_and_take_params(saved, pixels):
    model = hiera_jax.HieraForImageClassification.from_pretrained(
        saved["HieraForImageClassification"][1]
    )
    from hiera_jax.hf import modeling

    modeling._SHARED_FORWARDS.clear()
    first = model(pixels)
    second = model(pixels + 1)
    assert len(modeling._SHARED_FORWARDS) == 1
    assert next(iter(modeling._SHARED_FORWARDS.values()))._cache_size() == 1
    assert not np.array_equal(first.logits, second.logits)
    # Another model of the same config (a new load of the same weights) reuses the compiled
    # forward: one entry, one compile.
    again = hiera_jax.HieraForImageClassification.from_pretrained(
        saved["HieraForImageClassification"][1]
    )
    np.testing.assert_array_equal(again(pixels).logits, first.logits)
    assert len(modeling._SHARED_FORWARDS) == 1
    assert next(iter(modeling._SHARED_FORWARDS.values()))._cache_size() == 1

    def loss(params):
        return model(pixel_values=pixels, labels=np.array([1, 2]), params=params).loss

    grads = jax.grad(loss)(model.params)
    assert np.isfinite(np.asarray(grads["head"]["kernel"])).all()
    # The module API still works on the same object (channels-last).
    logits = jax.jit(model.apply)({"params": model.params}, np.moveaxis(pixels, 1, -1))
    np.testing.assert_allclose(logits, first.logits, rtol=1e-5, atol=1e-6)


def test_bad_calls_and_checkpoints_are_one_clear_error(saved, pixels, tmp_path):
    model = hiera_jax.HieraModel.from_pretrained(saved["HieraModel"][1])
    with pytest.raises(ValueError, match="pixel_values must be normalised floats"):
        model(pixel_values=(pixels * 50).astype(np.uint8))
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, C, H, W\]"):
        model(pixel_values=pixels[0])
    with pytest.raises(ValueError, match="is_mae=True"):
        model(pixels, noise=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="You have to specify pixel_values"):
        model()
    # A config.json whose architecture the tensors do not fit.
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((saved["HieraModel"][1] / "config.json").read_text())
    meta["depths"] = [1, 2, 5, 2]
    (bad / "config.json").write_text(json.dumps(meta))
    os.symlink(saved["HieraModel"][1] / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit the HieraModel that config.json describes"):
        hiera_jax.HieraModel.from_pretrained(bad)
    meta["hidden_act"] = "relu6"
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hidden_act='relu6' is not supported"):
        hiera_jax.HieraModel.from_pretrained(bad)


def test_a_classifier_for_another_class_count(saved, pixels):
    """transformers' finetuning start: another num_labels, the head initialised anew."""
    path = saved["HieraForImageClassification"][1]
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True"):
        hiera_jax.HieraForImageClassification.from_pretrained(path, num_labels=3)
    # Reported as transformers reports it: a size mismatch, with both shapes, not "missing".
    mismatch = (
        r"because the shapes did not match, and are newly initialised: "
        r"head/bias: checkpoint \((\d+),\) vs model \(3,\); "
        r"head/kernel: checkpoint \((\d+), \1\) vs model \(\2, 3\); train the model"
    )
    with pytest.warns(UserWarning, match=mismatch) as caught:
        model = hiera_jax.HieraForImageClassification.from_pretrained(
            path, num_labels=3, ignore_mismatched_sizes=True
        )
    assert not any("not in the checkpoint" in str(w.message) for w in caught)
    assert model.config.num_labels == 3 and model.config.id2label == {
        0: "LABEL_0",
        1: "LABEL_1",
        2: "LABEL_2",
    }
    assert model(pixels).logits.shape == (2, 3)
    source = hiera_jax.HieraForImageClassification.from_pretrained(path)
    np.testing.assert_array_equal(model.params["blocks_3"]["mlp"]["fc1"]["kernel"],
                                  source.params["blocks_3"]["mlp"]["fc1"]["kernel"])  # fmt: skip
