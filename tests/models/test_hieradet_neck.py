"""SAM 2's image encoder (`hiera_jax.models.hieradet_neck`) against the official `sam2` package.

The reference modules are built from SAM 2.1's own configs (`sam2/configs/sam2.1/*.yaml`, via
hydra's `instantiate`), given random weights, and compared in float32: the trunk
(`sam2.modeling.backbones.hieradet.Hiera`), `FpnNeck` with its `PositionEmbeddingSine`, and the
whole `ImageEncoder` output dict. Needs `sam2` (SAM2_BUILD_CUDA=0 pip install
--no-build-isolation sam2==1.1.0); skipped without it.
"""

import os

import jax
import numpy as np
import pytest
import torch
from helpers.reference import random_input, randomise_hieradet, rel_err, to_torch

from hiera_jax.models import hieradet, hieradet_neck
from hiera_jax.weights import hieradet_convert as convert

pytest.importorskip("sam2")
pytestmark = pytest.mark.reference
TOL = 1e-4
YAML = {  # SAM 2.1's config file of each timm variant name
    "sam2_hiera_tiny": "sam2.1_hiera_t.yaml",
    "sam2_hiera_small": "sam2.1_hiera_s.yaml",
    "sam2_hiera_base_plus": "sam2.1_hiera_b+.yaml",
    "sam2_hiera_large": "sam2.1_hiera_l.yaml",
}


def _encoder_config(name: str):
    import sam2
    from omegaconf import OmegaConf

    path = os.path.join(os.path.dirname(sam2.__file__), "configs", "sam2.1", YAML[name])
    return OmegaConf.load(path).model.image_encoder


def _sam2_encoder(name: str, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """SAM 2's ImageEncoder as its config builds it; random weights unless on meta."""
    from hydra.utils import instantiate

    linspace = torch.linspace

    def cpu_linspace(*args, **kw):  # SAM 2 calls .item() on it, which meta cannot do
        return linspace(*args, **{**kw, "device": "cpu"})

    torch.linspace = cpu_linspace
    try:
        with torch.device("meta"):
            model = instantiate(_encoder_config(name))
    finally:
        torch.linspace = linspace
    if device == "meta":
        return model
    model = model.to_empty(device=device)
    return randomise_hieradet(model, seed)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_sam2_configs_are_the_variants_and_the_neck_defaults():
    """SAM 2.1's four configs: trunk blocks, trunk and neck tensors, and neck arguments."""
    for name in YAML:
        model = _sam2_encoder(name, device="meta")
        config = hieradet.VARIANTS[name]
        theirs = [
            (b.dim, b.dim_out, b.attn.num_heads, b.window_size, b.q_stride and tuple(b.q_stride))
            for b in model.trunk.blocks
        ]
        ours = [(s.dim, s.dim_out, s.heads, s.window, s.q_stride) for s in config.block_specs]
        assert ours == theirs, name
        assert list(config.stage_dims[::-1]) == model.trunk.channel_list, name
        trunk_sd = {f"image_encoder.trunk.{k}": v for k, v in model.trunk.state_dict().items()}
        convert.check_state_dict(trunk_sd, name)
        assert convert.infer_config(trunk_sd) == config, name
        neck, pe = model.neck, model.neck.position_encoding
        ours = hieradet_neck.FpnNeckConfig()
        assert (ours.d_model, ours.fpn_interp_model, ours.fuse_type) == (
            neck.d_model,
            neck.fpn_interp_model,
            neck.fuse_type,
        ), name
        assert list(ours.fpn_top_down_levels) == neck.fpn_top_down_levels, name
        assert ours.scalp == model.scalp, name
        assert (ours.num_pos_feats // 2, ours.temperature, ours.normalize) == (
            pe.num_pos_feats,
            pe.temperature,
            pe.normalize,
        ), name
        conv = neck.convs[0].conv
        assert (conv.kernel_size, conv.stride, conv.padding) == (
            (ours.kernel_size,) * 2,
            (ours.stride,) * 2,
            (ours.padding,) * 2,
        ), name


def test_sine_position_encoding_matches_sam2():
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    for grid, feats in [((8, 8), 256), ((6, 10), 64), ((64, 64), 256)]:
        cfg = hieradet_neck.FpnNeckConfig(num_pos_feats=feats)
        theirs = PositionEmbeddingSine(feats, warmup_cache=False)(torch.zeros(2, 3, *grid))
        ours = hieradet_neck.sine_position_encoding(grid, cfg)
        assert rel_err(ours, _nhwc(theirs)[0]) < 1e-6
        np.testing.assert_array_equal(_nhwc(theirs)[0], _nhwc(theirs)[1])


@pytest.mark.parametrize(
    "interp,fuse,levels", [("bilinear", "avg", None), ("nearest", "sum", (1, 3))]
)
def test_fpn_neck_options_match_sam2(interp, fuse, levels):
    """Other FpnNeck settings than SAM 2's configs use, on random stage maps."""
    from sam2.modeling.backbones.image_encoder import FpnNeck
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    dims = [16, 32, 64, 128]
    torch.manual_seed(1)
    neck = FpnNeck(
        PositionEmbeddingSine(32, warmup_cache=False),
        d_model=32,
        backbone_channel_list=dims[::-1],
        fpn_interp_model=interp,
        fuse_type=fuse,
        fpn_top_down_levels=levels,
    ).eval()
    xs = [random_input((2, 16 // 2**i, 24 // 2**i, d), seed=i) for i, d in enumerate(dims)]
    with torch.no_grad():
        out, pos = neck([to_torch(x) for x in xs])
    cfg = hieradet_neck.FpnNeckConfig(
        d_model=32, num_pos_feats=32, fpn_interp_model=interp, fuse_type=fuse,
        fpn_top_down_levels=levels,
    )  # fmt: skip
    sd = {f"neck.{k}": v for k, v in neck.state_dict().items()}
    flat = {
        (f"convs_{k.split('.')[2]}", "kernel" if k.endswith("weight") else "bias"): (
            v.numpy().transpose(2, 3, 1, 0) if k.endswith("weight") else v.numpy()
        )
        for k, v in sd.items()
    }
    params = {c: {} for c, _ in flat}
    for (c, leaf), v in flat.items():
        params[c][leaf] = v
    ours, our_pos = jax.jit(lambda p, xs: hieradet_neck.FpnNeck(cfg).apply({"params": p}, xs))(
        params, xs
    )
    for a, b in zip(ours, out):
        assert rel_err(a, _nhwc(b)) < TOL
    for a, b in zip(our_pos, pos):
        assert rel_err(a, _nhwc(b)) < 1e-6


def test_image_encoder_matches_sam2(record_parity):
    name, size = "sam2_hiera_tiny", (128, 160)
    model = _sam2_encoder(name)
    x = random_input((2, *size, 3), seed=3)
    with torch.no_grad():
        trunk_maps = model.trunk(to_torch(x))
        expected = model(to_torch(x))
    checkpoint = {"model": {f"image_encoder.{k}": v for k, v in model.state_dict().items()}}
    checkpoint["model"]["sam_mask_decoder.iou_token.weight"] = torch.zeros(4, 256)  # skipped
    params = convert.convert_image_encoder_state_dict(checkpoint, name)
    config = hieradet.get_config(name, input_size=size)
    encoder = hieradet_neck.ImageEncoder(config)

    def run(p, x):
        out = encoder.apply({"params": p}, x)
        maps = hieradet.HieraDet(config).apply({"params": p["trunk"]}, x, True)[1]
        return out, maps

    out, maps = jax.jit(run)(params, x)
    label = f"{name} @{size}"
    worst = max(rel_err(a, _nhwc(b)) for a, b in zip(maps, trunk_maps, strict=True))
    assert record_parity(label, "sam2", "trunk stage maps (Hiera)", worst) < TOL
    err = rel_err(out["vision_features"], _nhwc(expected["vision_features"]))
    assert record_parity(label, "sam2", "vision_features", err) < TOL
    assert len(out["backbone_fpn"]) == len(expected["backbone_fpn"]) == 3
    worst = max(rel_err(a, _nhwc(b)) for a, b in zip(out["backbone_fpn"], expected["backbone_fpn"]))
    assert record_parity(label, "sam2", "backbone_fpn", worst) < TOL
    worst = max(
        rel_err(a, _nhwc(b)) for a, b in zip(out["vision_pos_enc"], expected["vision_pos_enc"])
    )
    assert record_parity(label, "sam2", "vision_pos_enc", worst) < TOL
    # Export writes SAM 2's keys back, tensor for tensor.
    exported = convert.export_image_encoder_state_dict(params, name)
    theirs = {k: v for k, v in checkpoint["model"].items() if k.startswith("image_encoder.")}
    assert exported.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_encoder_bad_inputs():
    with pytest.raises(ValueError, match="fpn_interp_model must be one of"):
        hieradet_neck.FpnNeckConfig(fpn_interp_model="bicubic")
    with pytest.raises(ValueError, match="num_pos_feats must be even"):
        hieradet_neck.FpnNeckConfig(num_pos_feats=255)
    with pytest.raises(ValueError, match="fuse_type"):
        hieradet_neck.FpnNeckConfig(fuse_type="max")
    config = hieradet.get_config("sam2_hiera_tiny", input_size=64)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    encoder = hieradet_neck.ImageEncoder(config, hieradet_neck.FpnNeckConfig(scalp=4))
    with pytest.raises(ValueError, match="scalp=4 drops all 4 levels"):
        jax.eval_shape(encoder.init, jax.random.key(0), x)
    meta = _sam2_encoder("sam2_hiera_tiny", "meta").state_dict()
    sd = {f"image_encoder.{k}": torch.zeros(v.shape) for k, v in meta.items()}
    del sd["image_encoder.neck.convs.3.conv.bias"]
    with pytest.raises(ValueError, match="not filled: convs_3/bias"):
        convert.convert_image_encoder_state_dict(sd, "sam2_hiera_tiny")
    narrow = hieradet_neck.FpnNeckConfig(d_model=128)
    with pytest.raises(ValueError, match=r"no place for neck.convs.0.conv.bias \(256,\)"):
        convert.convert_image_encoder_state_dict(sd, "sam2_hiera_tiny", narrow)
    with pytest.raises(
        ValueError, match=r"not image-encoder tensors \(trunk.\*, neck.\*\): stem.w"
    ):
        convert.convert_image_encoder_state_dict(
            {**sd, "image_encoder.stem.w": 0}, "sam2_hiera_tiny"
        )
