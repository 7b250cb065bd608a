"""Loading SAM 2's Hiera by name or path (`hiera_jax.weights.hieradet_loading.load_hieradet`).

Offline throughout: `HF_HOME` is a temporary folder with `HF_HUB_OFFLINE=1`, and the hub
caches are written by hand (`helpers.hub.write_hf_cache`) from random weights saved as each
ecosystem saves them: timm's `sam2_hiera_tiny` (model.safetensors + its config.json),
transformers' `Sam2Model` (`save_pretrained`) and a SAM 2 checkpoint (`{"model": ...}` of the
`sam2` package's ImageEncoder, plus a tensor of the rest of SAM 2, saved with torch.save). Each
load is compared with converting the same file directly, and the loaded module's output with
the torch model that wrote it, in float32.
"""

from __future__ import annotations

import json
import os

import flax
import jax
import numpy as np
import pytest
from helpers.hub import write_hf_cache
from helpers.reference import random_input, randomise_hieradet, rel_err, to_torch

import hiera_jax
from hiera_jax.models import hieradet, hieradet_neck
from hiera_jax.weights import hieradet_convert as convert
from hiera_jax.weights import hieradet_hf_config as transformers_configs  # noqa: E402
from hiera_jax.weights import hub
from hiera_jax.weights.formats import read_state_dict
from hiera_jax.weights.hieradet_loading import (
    HIERADET_PRETRAINED,
    list_hieradet_pretrained,
    load_hieradet,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference
TOL = 1e-4
SIZE = (128, 128)  # token grids 32, 16, 8, 4: the 14- and 7-token windows of stages 3-4 pad
TIMM_REPO = "timm/sam2_hiera_tiny.fb_r896_2pt1"
HF_REPO = "facebook/sam2.1-hiera-tiny"
SAM2_REPO = "facebook/sam2-hiera-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (folder or file, the torch model that wrote it)} for timm and transformers."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hieradet_checkpoints")
    with torch.device("meta"):
        trunk = timm.create_model("sam2_hiera_tiny", pretrained=False, num_classes=0)
    trunk = randomise_hieradet(trunk.to_empty(device="cpu"), seed=0)
    folder = root / "timm"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in trunk.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    timm_config = {
        "architecture": "sam2_hiera_tiny",
        "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, 896, 896], "tag": "fb_r896_2pt1"},
    }
    (folder / "config.json").write_text(json.dumps(timm_config))

    with torch.device("meta"):  # SAM 2.1 tiny is transformers' default Sam2Config
        sam = transformers.Sam2Model(transformers.Sam2Config())
    sam = sam.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in sam.buffers():
            buffer.normal_()  # the prompt encoder's random Fourier features
    sam = randomise_hieradet(sam, seed=1)
    sam.save_pretrained(root / "hf")
    return {"timm": (folder, trunk), "hf": (root / "hf", sam)}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh, offline HF_HOME."""
    for name in ("HF_HUB_CACHE", "HIERA_JAX_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home"


def assert_same_params(actual, expected):
    actual = flax.traverse_util.flatten_dict(jax.device_get(actual))
    expected = flax.traverse_util.flatten_dict(expected)
    assert sorted(actual) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(actual[path]), value, err_msg="/".join(path))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _check_encoder(module, params, expected_fpn, expected_pos, label, source, record_parity):
    """Our ImageEncoder's backbone_fpn / vision_pos_enc / vision_features against torch's."""
    out = jax.jit(module.apply)({"params": params}, X)
    assert len(out["backbone_fpn"]) == len(expected_fpn) == 3
    worst = max(rel_err(a, _nhwc(b)) for a, b in zip(out["backbone_fpn"], expected_fpn))
    assert record_parity(label, source, "backbone_fpn", worst) < TOL
    err = rel_err(out["vision_features"], _nhwc(expected_fpn[-1]))
    assert record_parity(label, source, "vision_features", err) < TOL
    worst = max(rel_err(a, _nhwc(b)) for a, b in zip(out["vision_pos_enc"], expected_pos))
    assert worst < 1e-6


X = random_input((1, *SIZE, 3), seed=7)


# ---------------------------------------------------------------------- timm (trunk)
def test_timm_names_load_the_trunk(files, home, record_parity):
    folder, model = files["timm"]
    write_hf_cache(home, TIMM_REPO, folder)
    state_dict, _ = read_state_dict(str(folder / "model.safetensors"))
    expected = convert.convert_state_dict(state_dict, "sam2_hiera_tiny")

    module, params = load_hieradet("sam2_hiera_tiny.fb_r896_2pt1", input_size=SIZE[0])
    assert isinstance(module, hieradet.HieraDet)
    assert module.config == hieradet.get_config("sam2_hiera_tiny", input_size=SIZE)
    assert_same_params(params, expected)
    with torch.no_grad():
        _, maps = model.forward_intermediates(to_torch(X), output_fmt="NHWC")
    _, ours = jax.jit(lambda p, x: module.apply({"params": p}, x, True))(params, X)
    worst = max(rel_err(a, b.numpy()) for a, b in zip(ours, maps, strict=True))
    assert record_parity(f"sam2_hiera_tiny @{SIZE}", "timm hub name", "stage maps", worst) < TOL

    # The repo id, hf-hub:, the local folder and the bare file give the same; without
    # input_size the config keeps the size timm's config.json publishes (896).
    for name in (TIMM_REPO, f"hf-hub:{TIMM_REPO}", str(folder)):
        module, again = load_hieradet(name)
        assert module.config.input_size == (896, 896)
        assert_same_params(again, expected)
    module, again = load_hieradet(str(folder / "model.safetensors"), dtype="bfloat16")
    assert module.config == hieradet.get_config("sam2_hiera_tiny", dtype="bfloat16")
    assert_same_params(again, expected)
    with pytest.raises(ValueError, match="trunk only .*encoder=False"):
        load_hieradet(TIMM_REPO, encoder=True)


# ---------------------------------------------------------------------- transformers (encoder)
def test_transformers_repo_loads_the_image_encoder(files, home, record_parity):
    folder, model = files["hf"]
    write_hf_cache(home, HF_REPO, folder)
    state_dict, config_json = read_state_dict(str(folder))
    trunk, neck = transformers_configs.configs_from_transformers(config_json)
    trunk = trunk.replace(input_size=SIZE)
    expected = convert.convert_image_encoder_state_dict(state_dict, trunk, neck)

    module, params = load_hieradet(HF_REPO, input_size=SIZE)
    assert isinstance(module, hieradet_neck.ImageEncoder)
    assert module.trunk == hieradet.get_config("sam2_hiera_tiny", input_size=SIZE)
    assert module.neck == hieradet_neck.FpnNeckConfig()
    assert_same_params(params, expected)
    with torch.no_grad():
        ref = model.vision_encoder(to_torch(X))
    fpn, pos = ref.fpn_hidden_states, ref.fpn_position_encoding
    label = f"sam2_hiera_tiny @{SIZE}"
    _check_encoder(module, params, fpn, pos, label, "transformers hub repo", record_parity)

    # The trunk alone, and the local directory, give the same tensors.
    trunk_module, trunk_params = load_hieradet(HF_REPO, encoder=False, input_size=SIZE)
    assert isinstance(trunk_module, hieradet.HieraDet)
    assert_same_params(trunk_params, expected["trunk"])
    _, again = load_hieradet(str(folder), input_size=SIZE)
    assert_same_params(again, expected)


# ---------------------------------------------------------------------- SAM 2's own checkpoint
def _sam2_encoder():
    pytest.importorskip("sam2")
    import sam2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = os.path.join(os.path.dirname(sam2.__file__), "configs", "sam2.1", "sam2.1_hiera_t.yaml")
    torch.manual_seed(0)
    return randomise_hieradet(instantiate(OmegaConf.load(path).model.image_encoder), seed=2)


def test_sam2_checkpoint_in_a_repo_without_transformers_files(home, tmp_path, record_parity):
    model = _sam2_encoder()
    checkpoint = {"model": {f"image_encoder.{k}": v for k, v in model.state_dict().items()}}
    checkpoint["model"]["sam_mask_decoder.iou_token.weight"] = torch.zeros(4, 256)  # skipped
    folder = tmp_path / "sam2_repo"
    folder.mkdir()
    torch.save(checkpoint, folder / "sam2_hiera_tiny.pt")
    write_hf_cache(home, SAM2_REPO, folder)
    expected = convert.convert_image_encoder_state_dict(
        checkpoint, hieradet.get_config("sam2_hiera_tiny", input_size=SIZE)
    )

    module, params = load_hieradet(SAM2_REPO, input_size=SIZE)
    assert isinstance(module, hieradet_neck.ImageEncoder)
    assert module.trunk == hieradet.get_config("sam2_hiera_tiny", input_size=SIZE)
    assert_same_params(params, expected)
    with torch.no_grad():
        ref = model(to_torch(X))
    fpn, pos = ref["backbone_fpn"], ref["vision_pos_enc"]
    label = f"sam2_hiera_tiny @{SIZE}"
    _check_encoder(module, params, fpn, pos, label, "sam2 .pt in a hub repo", record_parity)
    _, again = load_hieradet(str(folder / "sam2_hiera_tiny.pt"), input_size=SIZE)
    assert_same_params(again, expected)
    # hiera_jax.load_pretrained hands SAM 2's checkpoints to this loader (a file, a name).
    module, again = hiera_jax.load_pretrained(str(folder / "sam2_hiera_tiny.pt"), input_size=SIZE)
    assert isinstance(module, hieradet_neck.ImageEncoder)
    assert_same_params(again, expected)
    module, again = hiera_jax.load_pretrained(SAM2_REPO, input_size=SIZE[0], encoder=False)
    assert isinstance(module, hieradet.HieraDet)
    assert_same_params(again, expected["trunk"])
    with pytest.raises(ValueError, match="in_chans= is for Hiera checkpoints"):
        hiera_jax.load_pretrained(str(folder / "sam2_hiera_tiny.pt"), in_chans=1)


# ---------------------------------------------------------------------- the wrong model, names
def test_hiera_and_hieradet_checkpoints_are_told_apart(files, home, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    with torch.device("meta"):
        hiera = timm.create_model("hiera_tiny_224", pretrained=False)
    path = tmp_path / "hiera_tiny.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in hiera.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="is a Hiera checkpoint.*hiera_jax.load_pretrained"):
        load_hieradet(str(path))
    # load_pretrained reads SAM 2's folders (timm's, transformers') and repos as load_hieradet.
    for hieradet_path in (files["timm"][0], files["hf"][0]):
        module, params = hiera_jax.load_pretrained(str(hieradet_path))
        expected_module, expected = load_hieradet(str(hieradet_path))
        assert module == expected_module
        assert_same_params(params, jax.tree.map(np.asarray, expected))
    write_hf_cache(home, HF_REPO, files["hf"][0])
    module, _ = hiera_jax.load_pretrained(HF_REPO)
    assert isinstance(module, hieradet_neck.ImageEncoder)
    # Hiera's own conversion still refuses HieraDet tensors, naming the loader.
    with pytest.raises(ValueError, match="SAM 2's Hiera .*load_hieradet"):
        hub.infer_variant(read_state_dict(str(files["timm"][0] / "model.safetensors"))[0])

    # A table name whose repo holds another variant's tensors.
    write_hf_cache(home, "timm/sam2_hiera_small.fb_r896", files["timm"][0])
    with pytest.raises(ValueError, match="published as sam2_hiera_small, but .* sam2_hiera_tiny"):
        load_hieradet("sam2_hiera_small.fb_r896")


def test_bad_names_paths_and_options(files, home, tmp_path):
    with pytest.raises(ValueError, match="did you mean sam2_hiera_tiny.fb_r896"):
        load_hieradet("sam2_hiera_tiny.fb_r869")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_hieradet("runs/nothing_here.pt")
    # Offline and not cached: one line naming the repo, the file and where the cache is.
    with pytest.raises(hub.PretrainedNotFoundError) as info:
        load_hieradet("facebook/sam2.1-hiera-large")
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message
    assert "facebook/sam2.1-hiera-large" in message and str(home / "hub") in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no HieraDet weights"):
        load_hieradet(str(empty))
    folder = files["timm"][0]
    with pytest.raises(ValueError, match="token grid"):
        load_hieradet(str(folder), input_size=100)
    with pytest.raises(ValueError, match=r"cannot override \['embed_dim'\]"):
        load_hieradet(str(folder), embed_dim=64)
    with pytest.raises(ValueError, match="encoder must be None, True or False"):
        load_hieradet(str(folder), encoder="yes")
    # timm's config.json naming another variant than the tensors are.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    os.link(folder / "model.safetensors", renamed / "model.safetensors")
    (renamed / "config.json").write_text(json.dumps({"architecture": "sam2_hiera_large"}))
    with pytest.raises(ValueError, match="config.json names sam2_hiera_large, but"):
        load_hieradet(str(renamed))


def test_table():
    names = list_hieradet_pretrained()
    assert len(names) == 16
    for size, res in (("tiny", 896), ("small", 896), ("base_plus", 896), ("large", 1024)):
        for tag in (f"fb_r{res}", f"fb_r{res}_2pt1"):
            entry = HIERADET_PRETRAINED[f"sam2_hiera_{size}.{tag}"]
            assert entry.repo == f"timm/sam2_hiera_{size}.{tag}"
            assert entry.model == f"sam2_hiera_{size}"
        dashed = size.replace("_", "-")
        for release in ("sam2", "sam2.1"):
            entry = HIERADET_PRETRAINED[f"facebook/{release}-hiera-{dashed}"]
            assert entry.weight_files[-1] == (f"{release}_hiera_{size}.pt",)
