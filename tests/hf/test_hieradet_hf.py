"""SAM 2's image encoder (`hiera_jax.models.hieradet_neck`) against Hugging Face transformers'
`Sam2VisionModel` (`Sam2HieraDetModel` trunk + `Sam2VisionNeck`), and the transformers layout of
`hiera_jax.weights.hieradet_convert`.

The reference models are built from transformers' own configs (its `Sam2VisionConfig` defaults
are SAM 2.1 tiny; base_plus is written out below from SAM 2.1's `sam2.1_hiera_b+.yaml`), given
random weights, and compared in float32: every trunk stage map, the FPN levels and their sine
position encodings. Export writes transformers' keys back, which it loads with `strict=True`.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers.reference import random_input, randomise_hieradet, rel_err, to_torch

from hiera_jax.models import hieradet, hieradet_neck
from hiera_jax.weights import hieradet_convert as convert
from hiera_jax.weights import hieradet_hf_config as transformers_configs

pytestmark = pytest.mark.reference
TOL = 1e-4
# SAM 2.1 base_plus as transformers spells it (embed 112, heads 2, stages 2-3-16-3, global blocks
# 12/16/20, a 14x14 background table); the other fields are transformers' defaults.
BASE_PLUS = {
    "model_type": "sam2_vision_model",
    "backbone_config": {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 112,
        "blocks_per_stage": [2, 3, 16, 3],
        "embed_dim_per_stage": [112, 224, 448, 896],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "global_attention_blocks": [12, 16, 20],
        "window_positional_embedding_background_size": [14, 14],
    },
    "backbone_channel_list": [896, 448, 224, 112],
}
# (variant, transformers config, (H, W), batch): tiny's stage-3/4 windows (14, 7) pad the 6x8 and
# 3x4 grids; base_plus at 64x64 resizes its 14x14 table down to 16x16 tokens.
CASES = [
    ("sam2_hiera_tiny", {}, (96, 128), 2),
    ("sam2_hiera_base_plus", BASE_PLUS, (64, 64), 1),
]


def _hf_config(fields: dict) -> transformers.Sam2VisionConfig:
    return transformers.Sam2VisionConfig.from_dict(fields)


def _hf_model(config, seed: int = 0, device: str = "cpu") -> transformers.Sam2VisionModel:
    """transformers' Sam2VisionModel (built on meta: no init to pay for) with random weights."""
    with torch.device("meta"):
        model = transformers.Sam2VisionModel(config)
    if device == "meta":
        return model
    assert not list(model.buffers())  # every tensor is a parameter, so all are filled below
    model = model.to_empty(device=device)
    return randomise_hieradet(model, seed)


def _hf_run(model, x: np.ndarray) -> tuple:
    """(trunk output, Sam2VisionEncoderOutput) of one forward pass on NHWC `x`."""
    trunk = []
    hook = model.backbone.register_forward_hook(lambda mod, args, out: trunk.append(out))
    try:
        with torch.no_grad():
            out = model(to_torch(x))
    finally:
        hook.remove()
    return trunk[0], out


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _ours(params, trunk, neck, x):
    """Our ImageEncoder's outputs and the trunk's (final, stage maps), from one jitted apply."""
    encoder = hieradet_neck.ImageEncoder(trunk, neck)

    def run(p, x):
        out, state = encoder.apply(
            {"params": p},
            x,
            capture_intermediates=lambda mdl, _: isinstance(mdl, hieradet.HieraDet),
            mutable=["intermediates"],
        )
        return out, state["intermediates"]["trunk"]["__call__"][0]

    return jax.jit(run)(params, x)


@pytest.fixture(scope="module")
def tiny():
    """(HF model, its state dict, our configs, converted params) for tiny at CASES[0]."""
    name, fields, size, _ = CASES[0]
    model = _hf_model(_hf_config(fields))
    sd = model.state_dict()
    trunk, neck = transformers_configs.configs_from_transformers(model.config)
    trunk = trunk.replace(input_size=size)
    return model, sd, trunk, neck, convert.convert_image_encoder_state_dict(sd, trunk, neck)


@pytest.mark.parametrize("name,fields,size,batch", CASES, ids=[c[0] for c in CASES])
def test_vision_model_matches_transformers(tiny, record_parity, name, fields, size, batch):
    if name == CASES[0][0]:
        model, sd, trunk, neck, params = tiny
    else:
        model = _hf_model(_hf_config(fields), seed=1)
        sd = model.state_dict()
        trunk, neck = transformers_configs.configs_from_transformers(model.config)
        trunk = trunk.replace(input_size=size)
        params = convert.convert_image_encoder_state_dict(sd, trunk, neck)
    assert trunk == hieradet.get_config(name, input_size=size)
    assert neck == hieradet_neck.FpnNeckConfig()
    x = random_input((batch, *size, 3), seed=3)
    ref_trunk, ref = _hf_run(model, x)
    out, (final, maps) = _ours(params, trunk, neck, x)

    label = f"{name} @{size}"
    assert len(maps) == len(ref_trunk.intermediate_hidden_states) == 4
    worst = max(rel_err(a, b.numpy()) for a, b in zip(maps, ref_trunk.intermediate_hidden_states))
    assert record_parity(label, "transformers", "trunk stage maps", worst) < TOL
    err = rel_err(final, ref.last_hidden_state.numpy())  # transformers: the trunk's last map
    assert record_parity(label, "transformers", "last_hidden_state", err) < TOL
    assert len(out["backbone_fpn"]) == len(ref.fpn_hidden_states) == 3  # finest first
    worst = max(rel_err(a, _nhwc(b)) for a, b in zip(out["backbone_fpn"], ref.fpn_hidden_states))
    assert record_parity(label, "transformers", "fpn_hidden_states (backbone_fpn)", worst) < TOL
    err = rel_err(out["vision_features"], _nhwc(ref.fpn_hidden_states[-1]))
    assert record_parity(label, "transformers", "vision_features", err) < TOL
    assert len(out["vision_pos_enc"]) == len(ref.fpn_position_encoding) == 3
    worst = max(
        rel_err(a, _nhwc(b)) for a, b in zip(out["vision_pos_enc"], ref.fpn_position_encoding)
    )
    assert record_parity(label, "transformers", "fpn_position_encoding", worst) < TOL


def test_full_model_keys_are_the_vision_model_s(tiny):
    """A Sam2Model / Sam2VideoModel checkpoint: `vision_encoder.*` converts, the rest is skipped."""
    _, sd, trunk, neck, params = tiny
    full = {f"vision_encoder.{k}": v for k, v in sd.items()}
    for cls, config in [
        (transformers.Sam2Model, transformers.Sam2Config()),
        (transformers.Sam2VideoModel, transformers.Sam2VideoConfig()),
    ]:
        with torch.device("meta"):  # never read: skipped before any tensor is
            rest = {
                k: v for k, v in cls(config).state_dict().items() if not k.startswith("vision_")
            }
        assert rest and not set(rest) & set(full)
        checkpoint = {**full, **rest}
        jax.tree.map(
            np.testing.assert_array_equal,
            convert.convert_image_encoder_state_dict(checkpoint, trunk, neck),
            params,
        )
        jax.tree.map(
            np.testing.assert_array_equal,
            convert.convert_state_dict(checkpoint, trunk),
            params["trunk"],
        )
    # Trunk alone: a Sam2VisionModel (neck skipped) or a bare Sam2HieraDetModel.
    bare = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    for trunk_sd in (sd, bare):
        jax.tree.map(
            np.testing.assert_array_equal,
            convert.convert_state_dict(trunk_sd, trunk),
            params["trunk"],
        )
    assert convert.infer_config(bare).replace(input_size=trunk.input_size) == trunk


def test_export_round_trips_and_loads_into_transformers(tiny):
    model, sd, trunk, neck, params = tiny
    exported = convert.export_image_encoder_state_dict(params, trunk, neck, format="transformers")
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    # A fresh model from the exported config, filled by strict loading, runs as the original.
    config = transformers.Sam2VisionConfig(
        **transformers_configs.transformers_vision_config(trunk, neck)
    )
    fresh = _hf_model(config, device="meta")
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, assign=True)
    fresh.eval()
    x = random_input((1, *trunk.input_size, 3), seed=5)
    theirs, ours = _hf_run(model, x)[1], _hf_run(fresh, x)[1]
    for a, b in zip(
        (ours.last_hidden_state, *ours.fpn_hidden_states, *ours.fpn_position_encoding),
        (theirs.last_hidden_state, *theirs.fpn_hidden_states, *theirs.fpn_position_encoding),
        strict=True,
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The trunk alone loads strictly into transformers' Sam2HieraDetModel.
    trunk_sd = convert.export_state_dict(params["trunk"], trunk, format="transformers")
    result = fresh.backbone.load_state_dict(
        {k: torch.from_numpy(v) for k, v in trunk_sd.items()}, strict=True
    )
    assert not result.missing_keys and not result.unexpected_keys


def test_config_mapping():
    # Our copies of transformers' defaults (for config.json files written as differences).
    hf_trunk = transformers.Sam2HieraDetConfig().to_dict()
    assert {k: hf_trunk[k] for k in transformers_configs.TRANSFORMERS_TRUNK_DEFAULTS} == (
        transformers_configs.TRANSFORMERS_TRUNK_DEFAULTS
    )
    hf_vision = transformers.Sam2VisionConfig().to_dict()
    assert {k: hf_vision[k] for k in transformers_configs.TRANSFORMERS_VISION_DEFAULTS} == (
        transformers_configs.TRANSFORMERS_VISION_DEFAULTS
    )
    tiny = (hieradet.VARIANTS["sam2_hiera_tiny"], hieradet_neck.FpnNeckConfig())
    full = transformers.Sam2Config()
    for config in (
        transformers.Sam2VisionConfig(),
        full,
        full.to_dict(),
        full.to_diff_dict(),
        transformers.Sam2VideoConfig(),
        {"model_type": "sam2", "vision_config": {"backbone_config": {}}},
        {"fpn_hidden_size": 256},  # a bare vision dict: transformers' defaults fill the rest
        {},
    ):
        assert transformers_configs.configs_from_transformers(config) == tiny, config
    assert (
        transformers_configs.trunk_config_from_transformers(transformers.Sam2HieraDetConfig())
        == tiny[0]
    )
    assert (
        transformers_configs.trunk_config_from_transformers({"blocks_per_stage": [1, 2, 7, 2]})
        == tiny[0]
    )
    base_plus = transformers_configs.configs_from_transformers(BASE_PLUS)
    assert base_plus == (hieradet.VARIANTS["sam2_hiera_base_plus"], tiny[1])
    # Ours -> transformers: tiny's is transformers' own default config; every variant builds a
    # model whose blocks are ours and whose tensors fit our converter, and maps back to itself.
    written = transformers.Sam2VisionConfig(
        **transformers_configs.transformers_vision_config("sam2_hiera_tiny")
    )
    ignore = ("backbone_config", "_name_or_path", "transformers_version")
    assert {k: v for k, v in written.to_dict().items() if k not in ignore} == {
        k: v for k, v in hf_vision.items() if k not in ignore
    }
    written_trunk = written.backbone_config.to_dict()
    assert {k: v for k, v in written_trunk.items() if k not in ignore} == {
        k: v for k, v in hf_vision["backbone_config"].items() if k not in ignore
    }
    for name, variant in hieradet.VARIANTS.items():
        config = transformers.Sam2VisionConfig(
            **transformers_configs.transformers_vision_config(variant)
        )
        assert transformers_configs.configs_from_transformers(config) == (variant, tiny[1]), name
        assert transformers_configs.configs_from_transformers(config.to_dict()) == (
            variant,
            tiny[1],
        ), name
        model = _hf_model(config, device="meta")
        theirs = [
            (b.dim, b.dim_out, b.attn.num_attention_heads, b.window_size, b.query_stride)
            for b in model.backbone.blocks
        ]
        ours = [
            (s.dim, s.dim_out, s.heads, s.window, s.q_stride and list(s.q_stride))
            for s in variant.block_specs
        ]
        assert ours == theirs, name
        convert.check_state_dict(model.state_dict(), variant)
    custom = hieradet_neck.FpnNeckConfig(d_model=64, num_pos_feats=64, fpn_top_down_levels=None)
    back = transformers_configs.configs_from_transformers(
        transformers_configs.transformers_vision_config("sam2_hiera_tiny", custom)
    )
    assert back == (tiny[0], dataclasses.replace(custom, fpn_top_down_levels=(0, 1, 2, 3))), back
    assert transformers_configs.configs_from_transformers({"num_feature_levels": 4})[1].scalp == 0


def test_bad_inputs_are_clear_value_errors(tiny):
    _, sd, trunk, neck, _ = tiny
    meta = _hf_model(transformers.Sam2VisionConfig(), device="meta").state_dict()
    name = "sam2_hiera_tiny"
    with pytest.raises(ValueError, match=r"no place for: backbone.blocks.3.attn.extra.weight"):
        convert.check_state_dict(
            {**meta, "backbone.blocks.3.attn.extra.weight": meta["backbone.pos_embed"]}, name
        )
    with pytest.raises(
        ValueError,
        match=r"shape mismatches:\n  pos_embed -> pos_embed: checkpoint \(1, 14, 14, 96\) .*"
        r"\(checkpoint key backbone.pos_embed\)",
    ):
        convert.check_state_dict(
            {**meta, "backbone.pos_embed": torch.zeros(1, 96, 14, 14, device="meta")}, name
        )
    with pytest.raises(ValueError, match=r"does not fill: blocks_11/mlp/fc2/bias"):
        convert.check_state_dict(
            {k: v for k, v in meta.items() if k != "backbone.blocks.11.mlp.proj_out.bias"}, name
        )
    with pytest.raises(ValueError, match=r"no place for: memory_bank.weight"):
        convert.check_state_dict(
            {
                **{f"vision_encoder.{k}": v for k, v in meta.items()},
                "mask_decoder.conv_s0.weight": 0,  # skipped
                "memory_bank.weight": 0,  # neither vision nor a known Sam2Model part
            },
            name,
        )
    mixed = {**meta, "backbone.blocks.0.norm1.weight": meta["backbone.blocks.0.layer_norm1.weight"]}
    with pytest.raises(ValueError, match=r"a second blocks.0.norm1.weight"):
        convert.check_state_dict(mixed, name)
    # The whole encoder: the neck's tensors and the full model's other keys.
    with pytest.raises(ValueError, match=r"not filled: convs_3/bias"):
        convert.convert_image_encoder_state_dict(
            {k: v for k, v in sd.items() if k != "neck.convs.3.bias"}, trunk, neck
        )
    narrow = dataclasses.replace(neck, d_model=128, num_pos_feats=128)
    with pytest.raises(ValueError, match=r"no place for neck.convs.0.bias \(256,\)"):
        convert.convert_image_encoder_state_dict(sd, trunk, narrow)
    with pytest.raises(ValueError, match=r"no place for neck.convs.0.conv.weight"):
        convert.convert_image_encoder_state_dict(  # SAM 2's neck name in a transformers dict
            {
                ("neck.convs.0.conv.weight" if k == "neck.convs.0.weight" else k): v
                for k, v in sd.items()
            },
            trunk,
            neck,
        )
    full = {f"vision_encoder.{k}": v for k, v in sd.items()}
    with pytest.raises(
        ValueError, match=r"not tensors of a transformers Sam2Model .*: memory_bank.w"
    ):
        convert.convert_image_encoder_state_dict({**full, "memory_bank.w": 0}, trunk, neck)
    with pytest.raises(ValueError, match=r"not image-encoder tensors \(backbone.\*, neck.\*"):
        convert.convert_image_encoder_state_dict({**full, "vision_encoder.stem.w": 0}, trunk, neck)
    with pytest.raises(ValueError, match="format must be one of"):
        convert.export_image_encoder_state_dict({}, trunk, neck, format="hf")
    # Configs transformers has and we do not run as it does, or that do not make a model.
    bad_trunks = [
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
        ({"query_stride": [2, 1]}, r"query_stride=\[2, 1\]: transformers unpartitions"),
        ({"embed_dim_per_stage": [96, 192, 384, 700]}, "does not grow by one factor"),
        ({"num_attention_heads_per_stage": [1, 2, 4, 0]}, "must be positive integers"),
        ({"hidden_size": 64}, r"hidden_size=64 .* differs from embed_dim_per_stage\[0\]=96"),
        ({"window_size_per_stage": [8, 4, 14]}, "must have one entry per stage"),
        ({"global_attention_blocks": [5, 7, 12]}, "no HieraDet equal: global_att_blocks"),
        ({"num_query_pool_stages": 1.5}, "num_query_pool_stages must be an integer"),
    ]
    for fields, message in bad_trunks:
        with pytest.raises(ValueError, match=message):
            transformers_configs.configs_from_transformers({"backbone_config": fields})
    bad = [
        ({"backbone_channel_list": [768, 384, 192, 64]}, "backbone_channel_list .* coarsest first"),
        ({"num_feature_levels": 0}, "num_feature_levels must be a positive integer"),
        ({"fpn_kernel_size": [1, 1]}, "no FpnNeck equal: kernel_size must be a positive integer"),
        ({"model_type": "sam"}, "model_type 'sam' is not a transformers SAM 2 config"),
        ({"backbone_config": {"model_type": "resnet"}}, "only SAM 2's HieraDet"),
        ({"hidden_size": 96, "fpn_hidden_size": 256}, "nest the former under backbone_config"),
        (transformers.Sam2HieraDetConfig(), "holds no neck settings"),
        ("sam2_hiera_tiny", "must be a transformers config or its dict"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            transformers_configs.configs_from_transformers(config)
    with pytest.raises(ValueError, match="transformers' neck is 'nearest' and 'sum'"):
        transformers_configs.transformers_vision_config(
            trunk, dataclasses.replace(neck, fpn_interp_model="bilinear")
        )
    with pytest.raises(ValueError, match="LayerScale"):
        transformers_configs.transformers_vision_config(trunk.replace(init_values=1e-5), neck)
