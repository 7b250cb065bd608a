"""Pretrained weights by name (`hiera_jax.weights.hub`), without network.

Every test points `HF_HOME` at a temporary folder and sets `HF_HUB_OFFLINE=1`. The Hugging Face
tests write a real hub cache by hand (`hub/models--<owner>--<repo>/{blobs,snapshots/<commit>,
refs/main}`, files linked to blobs as huggingface_hub does) holding random weights saved by
transformers (`save_pretrained`) or timm; `snapshot_download` then finds them offline. Official
`.pth` URLs are `file://` URLs. Each load is compared with a direct conversion of the same file,
and the converter is counted to show that a second load does not convert again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest
from helpers.hub import COMMIT, write_hf_cache

import hiera_jax
from hiera_jax.weights import hub
from hiera_jax.weights.formats import read_state_dict

OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
HF_REPO = "facebook/hiera-tiny-224-in1k-hf"
TIMM_REPO = "timm/hiera_tiny_224.mae_in1k_ft_in1k"
TIMM_MAE_REPO = "timm/hiera_tiny_224.mae"


# ---------------------------------------------------------------------- checkpoints (once)
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random tiny checkpoints as each ecosystem saves them: {kind: folder or file}."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    from helpers.reference import official_model
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    config = transformers.HieraConfig(depths=[1, 2, 7, 2], num_labels=1000)
    transformers.HieraForImageClassification(config).save_pretrained(root / "hf")

    def timm_folder(folder, **kwargs):
        model = timm.create_model("hiera_tiny_224", pretrained=False, **kwargs)
        folder.mkdir()
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"architecture": "hiera_tiny_224"}))
        return folder

    torch.manual_seed(1)
    out = {"hf": root / "hf", "timm": timm_folder(root / "timm")}
    torch.manual_seed(2)
    out["timm_mae"] = timm_folder(root / "timm_mae", num_classes=0)
    official = official_model("hiera_tiny_224", seed=3)
    out["official"] = root / "hiera_tiny_224.pth"
    torch.save({"model_state": official.state_dict()}, out["official"])
    return out


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh, offline HF_HOME (our cache defaults to $HF_HOME/hiera_jax)."""
    for name in ("HF_HUB_CACHE", "HIERA_JAX_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home"


@pytest.fixture
def conversions(monkeypatch):
    """Counts the hub's conversions of a source checkpoint into its cache (each reads the variant
    from the tensors once, `hub.infer_variant`)."""
    calls = []
    original = hub.infer_variant

    def counting(state_dict, *args):
        result = original(state_dict, *args)
        calls.append(result[0])
        return result

    monkeypatch.setattr(hub, "infer_variant", counting)
    return calls


def assert_same_params(actual, expected):
    actual = flax.traverse_util.flatten_dict(jax.device_get(actual))
    expected = flax.traverse_util.flatten_dict(expected)
    assert sorted(actual) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(actual[path]), value, err_msg="/".join(path))


def direct(path, name, source, model_type=None):
    state_dict, _ = read_state_dict(str(path))
    return hiera_jax.convert_state_dict(state_dict, name, source, model_type=model_type)


# ---------------------------------------------------------------------- Hugging Face repos
def test_hf_repo_loads_offline_in_place(files, home, conversions):
    snapshot = write_hf_cache(home, HF_REPO, files["hf"])
    expected = direct(files["hf"] / "model.safetensors", "hiera_tiny_224", "hf")

    model, params = hiera_jax.load_pretrained(HF_REPO)
    assert isinstance(model, hiera_jax.HieraForImageClassification)
    # The repo's config.json is the architecture: tiny, with transformers' placeholder names.
    assert model.config == hiera_jax.get_config("hiera_tiny_224")
    assert model.config.id2label[3] == "LABEL_3"
    assert_same_params(params, expected)
    # Read where huggingface_hub keeps it: nothing converted, nothing copied into our cache.
    assert hub.resolve_pretrained(HF_REPO) == str(snapshot)
    assert not conversions and not (home / "hiera_jax" / "hf").exists()

    # The same weights again, by repo id, by our name (its first source), with the commit as
    # revision, through create_model and as each Hugging Face-style class.
    for name, kwargs in [
        (HF_REPO, {}),
        ("hiera_tiny_224", {}),
        ("hiera_tiny_224", {"source": "hf", "revision": COMMIT}),
    ]:
        _, again = hiera_jax.load_pretrained(name, **kwargs)
        assert_same_params(again, expected)
    model, again = hiera_jax.create_model("hiera_tiny_224", pretrained=True, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert_same_params(again, expected)
    classifier = hiera_jax.HieraForImageClassification.from_pretrained("hiera_tiny_224")
    assert_same_params(classifier.params, expected)
    # Asked for as HieraModel, the in1k repo drops its head (as transformers does).
    backbone = hiera_jax.HieraModel.from_pretrained(HF_REPO)
    assert_same_params(backbone.params, {k: v for k, v in expected.items() if k != "head"})
    assert not conversions

    # A new commit on main is another snapshot folder, read in place too.
    write_hf_cache(home, HF_REPO, files["hf"], commit=OTHER_COMMIT)
    assert hub.resolve_pretrained(HF_REPO).split(os.sep)[-1] == OTHER_COMMIT


def test_timm_hub_names(files, home, conversions):
    write_hf_cache(home, TIMM_REPO, files["timm"])
    write_hf_cache(home, TIMM_MAE_REPO, files["timm_mae"])
    expected = direct(files["timm"] / "model.safetensors", "hiera_tiny_224", "timm")
    conversions.clear()

    _, params = hiera_jax.load_pretrained(f"hf-hub:{TIMM_REPO}")
    assert_same_params(params, expected)
    for name, kwargs in [
        ("hiera_tiny_224.mae_in1k_ft_in1k", {}),  # timm's name with its tag means timm's weights
        (TIMM_REPO, {}),
        ("hiera_tiny_224", {"source": "timm"}),
    ]:
        _, again = hiera_jax.load_pretrained(name, **kwargs)
        assert_same_params(again, expected)
    classifier = hiera_jax.HieraForImageClassification.from_pretrained(
        "hiera_tiny_224.mae_in1k_ft_in1k"
    )
    assert_same_params(classifier.params, expected)
    assert len(conversions) == 1

    # timm's `.mae` is the MAE encoder without a classifier: a HieraModel (backbone).
    model, params = hiera_jax.load_pretrained("hiera_tiny_224.mae")
    assert isinstance(model, hiera_jax.HieraModel)
    expected = direct(
        files["timm_mae"] / "model.safetensors", "hiera_tiny_224", "timm", model_type="backbone"
    )
    assert_same_params(params, expected)
    assert len(conversions) == 2


def test_timm_repo_config_json_names_the_variant(home, tmp_path, conversions):
    """timm's abswin Hiera is no official variant: its repo's config.json names it."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch = pytest.importorskip("torch")
    torch.manual_seed(4)
    model = timm.create_model("hiera_small_abswin_256", pretrained=False, num_classes=10)
    folder = tmp_path / "abswin"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(
        json.dumps({"architecture": "hiera_small_abswin_256", "num_classes": 10})
    )
    write_hf_cache(home, "timm/hiera_small_abswin_256.test", folder)
    loaded, params = hiera_jax.load_pretrained("timm/hiera_small_abswin_256.test")
    assert loaded.config == hiera_jax.get_config("hiera_small_abswin_256", num_classes=10)
    assert_same_params(params, direct(folder / "model.safetensors", loaded.config, "timm"))
    assert conversions == ["hiera_small_abswin_256"]
    # A config.json that names a variant the tensors are not is refused.
    (folder / "config.json").write_text(json.dumps({"architecture": "hiera_base_224"}))
    with pytest.raises(ValueError, match="names hiera_base_224, but its tensors are 96 wide"):
        hiera_jax.load_pretrained(str(folder))


def test_offline_miss_is_one_line_naming_the_file_and_place(home, tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as info:
        hiera_jax.load_pretrained(HF_REPO)
    message = str(info.value)
    assert "\n" not in message
    for part in (HF_REPO, "model.safetensors", str(home / "hub"), "HF_HUB_OFFLINE=1"):
        assert part in message, (part, message)

    # From Python too, one exception, not a chain of four: the line says all there is.
    import traceback

    for name in (HF_REPO, "hiera_tiny_224"):
        with pytest.raises(hub.PretrainedNotFoundError) as info:
            hiera_jax.load_pretrained(name)
        shown = "".join(traceback.format_exception(info.value))
        assert "direct cause" not in shown and "During handling" not in shown, shown[-2000:]
        assert shown.count("Error: ") == 1, shown[-2000:]

    # An official-only name (video): the .pth URL and where to put the file.
    with pytest.raises(hub.PretrainedNotFoundError) as info:
        hiera_jax.load_pretrained("hiera_base_16x224")
    message = str(info.value)
    assert "\n" not in message
    url = "https://dl.fbaipublicfiles.com/hiera/hiera_base_16x224.pth"
    for part in (url, str(home / "hiera_jax" / "downloads" / "hiera_base_16x224.pth")):
        assert part in message, (part, message)

    # The predict CLI: the same line after "error:", exit code 2.
    from PIL import Image

    from hiera_jax import predict

    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", "hiera_tiny_224", str(image)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "facebook/hiera-tiny-224-in1k-hf" in err and "hf download" in err


def test_unknown_names():
    with pytest.raises(ValueError, match="did you mean hiera_tiny_224"):
        hiera_jax.load_pretrained("hiera_tiny_244")
    with pytest.raises(ValueError, match="has no 'timm' source"):
        hub.resolve_pretrained("mae_hiera_tiny_224", source="timm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hiera_jax.load_pretrained("runs/nothing_here")  # a path, not a repo of an unknown owner


def test_predict_cli_takes_names(files, home):
    from hiera_jax import predict

    write_hf_cache(home, HF_REPO, files["hf"])
    args = predict.parse_args(["--checkpoint", "hiera_tiny_224", "cat.png"])
    predictor = predict.build_predictor(args)
    assert predictor.source == hub.resolve_pretrained(HF_REPO)
    assert predictor.has_head and predictor.config.num_classes == 1000


# ---------------------------------------------------------------------- official URLs
def test_official_url_checksum_cache(files, home, conversions, monkeypatch):
    url = files["official"].as_uri()  # file:// works offline; http(s) is refused offline
    entry = dataclasses.replace(hub.PRETRAINED["hiera_tiny_224"], url=url)
    monkeypatch.setitem(hub.PRETRAINED, "hiera_tiny_224", entry)
    expected = direct(files["official"], "hiera_tiny_224", "official")
    sha = hashlib.sha256(files["official"].read_bytes()).hexdigest()
    conversions.clear()

    _, params = hiera_jax.load_pretrained("hiera_tiny_224", source="official")
    assert_same_params(params, expected)
    cached = home / "hiera_jax" / "downloads" / "hiera_tiny_224.pth"
    assert cached.read_bytes() == files["official"].read_bytes()
    assert (
        home / "hiera_jax" / "downloads" / "hiera_tiny_224.pth.sha256"
    ).read_text().strip() == sha
    converted = home / "hiera_jax" / "official" / "hiera_tiny_224" / sha[:16]
    assert (converted / "hiera_tiny_224-classification" / "config.json").is_file()

    # Second load: the converted copy, found through the recorded sha256 (no download, no
    # conversion); the URL itself also resolves to it (the variant is read from the tensors).
    _, again = hiera_jax.load_pretrained("hiera_tiny_224", source="official")
    assert_same_params(again, expected)
    assert hub.resolve_pretrained(url) == str(converted / "hiera_tiny_224-classification")
    backbone = hiera_jax.HieraModel.from_pretrained(url)  # the URL, asked for as HieraModel
    assert_same_params(backbone.params, {k: v for k, v in expected.items() if k != "head"})
    assert len(conversions) == 1
    assert hub.download_url(url) == str(cached)  # verified against the record

    # A corrupted cached file is detected whenever it is used again.
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(hub.ChecksumError, match="is corrupted: sha256"):
        hub.download_url(url)
    shutil.rmtree(converted)
    with pytest.raises(ValueError, match=f"cached file {cached} is corrupted"):
        hiera_jax.load_pretrained("hiera_tiny_224", source="official")
    assert len(conversions) == 1


def test_hash_prefix_in_file_name_is_checked(files, home, tmp_path):
    sha = hashlib.sha256(files["official"].read_bytes()).hexdigest()
    wrong = tmp_path / "hiera_tiny_224-deadbeef.pth"
    shutil.copyfile(files["official"], wrong)
    with pytest.raises(hub.ChecksumError, match="does not start with the deadbeef"):
        hub.download_url(wrong.as_uri())
    assert not (home / "hiera_jax" / "downloads" / wrong.name).exists()

    right = tmp_path / f"hiera_tiny_224-{sha[:10]}.pth"
    shutil.copyfile(files["official"], right)
    cached = hub.download_url(right.as_uri())
    os.remove(cached + ".sha256")  # without a record, the name's prefix still catches damage
    with open(cached, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    with pytest.raises(hub.ChecksumError, match=f"expected {sha[:10]}"):
        hub.download_url(right.as_uri())


def test_http_download_refused_offline_and_failures_are_one_line(home, monkeypatch):
    def no_fetch(url, path):
        raise AssertionError("must not download while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(hub, "_fetch", no_fetch)
    with pytest.raises(hub.PretrainedNotFoundError, match="downloads are off"):
        hub.download_url("https://dl.fbaipublicfiles.com/hiera/hiera_tiny_224.pth")

    # Online but unreachable: the reason and where to put the file, on one line.
    import urllib.error

    def unreachable(url, path):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "is_offline", lambda: False)
    monkeypatch.setattr(hub, "_fetch", unreachable)
    with pytest.raises(hub.PretrainedNotFoundError) as info:
        hub.download_url("https://dl.fbaipublicfiles.com/hiera/mae_hiera_tiny_224.pth")
    message = str(info.value)
    assert "\n" not in message and "name resolution" in message
    assert str(home / "hiera_jax" / "downloads" / "mae_hiera_tiny_224.pth") in message


# ---------------------------------------------------------------------- local files
def test_local_pytorch_files_convert_once(files, home, conversions):
    conversions.clear()
    expected = direct(files["official"], "hiera_tiny_224", "official")
    for _ in range(2):
        model, params = hiera_jax.load_pretrained(str(files["official"]))
        assert isinstance(model, hiera_jax.HieraForImageClassification)
        assert_same_params(params, expected)
    assert len(conversions) == 1
    assert hub.resolve_pretrained(str(files["official"])).startswith(
        str(home / "hiera_jax" / "local")
    )
    # A transformers directory is read in place, a bare weights file is converted once.
    _, params = hiera_jax.load_pretrained(str(files["hf"]))
    assert_same_params(params, direct(files["hf"] / "model.safetensors", "hiera_tiny_224", "hf"))
    assert hub.resolve_pretrained(str(files["hf"])) == str(files["hf"])
    _, params = hiera_jax.load_pretrained(str(files["hf"] / "model.safetensors"))
    assert_same_params(params, direct(files["hf"] / "model.safetensors", "hiera_tiny_224", "hf"))
    assert len(conversions) == 2


# ---------------------------------------------------------------------- the table
def test_table_covers_every_variant():
    for name in hiera_jax.list_models():
        entry = hub.PRETRAINED[name]
        assert entry.model == name and entry.url == hub.OFFICIAL_URL.format(file=name)
        video = name.endswith("16x224")
        assert (entry.hf is None) == video  # transformers has no video Hiera
        assert (entry.timm is None) == (video or name.startswith("mae_"))
    assert hub.PRETRAINED["hiera_base_plus_224"].hf == "facebook/hiera-base-plus-224-in1k-hf"
    assert hub.PRETRAINED["mae_hiera_huge_224"].hf == "facebook/hiera-huge-224-mae-hf"
    assert hub.PRETRAINED["hiera_large_224.mae"].hf == "facebook/hiera-large-224-hf"
    assert "hiera_base_224" in hiera_jax.list_pretrained()


@pytest.mark.parametrize("name", sorted(hiera_jax.list_models()))
def test_infer_variant_from_official_shapes(name):
    pytest.importorskip("hiera")
    from helpers.reference import official_on_meta

    state_dict = official_on_meta(name).state_dict()
    model_type = "pretraining" if name.startswith("mae_") else "classification"
    assert hub.infer_variant(state_dict) == (name, model_type, {})
    if not name.startswith("mae_"):  # without the head: a backbone; another class count
        head = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        assert hub.infer_variant(head) == (name, "backbone", {})
        state_dict["head.projection.weight"] = state_dict["head.projection.weight"][:10]
        assert hub.infer_variant(state_dict) == (name, model_type, {"num_classes": 10})
