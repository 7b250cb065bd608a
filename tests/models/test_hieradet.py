"""SAM 2's Hiera trunk (`hiera_jax.models.hieradet`) and its converter against timm's
`hieradet_sam2`.

Every variant runs on random timm weights (the qkv weights large enough that attention is
peaked, so a head or window mix-up shows; LayerNorm affine and position tables randomised),
converted with our converter and compared in float32 with timm's `forward_intermediates`, at a
small input whose later stages are not a whole number of windows (so the padding is
exercised), and tiny at SAM 2's 1024. timm's `HieraDet` takes any size (it has no `img_size`).
"""

import jax
import numpy as np
import pytest
import torch
from helpers.reference import random_input, randomise_hieradet, rel_err, to_torch

from hiera_jax.models import hieradet
from hiera_jax.weights import hieradet_convert as convert

pytestmark = pytest.mark.reference
TOL = 1e-4
NAMES = tuple(hieradet.VARIANTS)
# (variant, (H, W), batch, attention_kernel): stage 3 and 4 grids are padded to whole windows
# in every case. tiny at 128 runs the default kernel switch ("auto": on CPU a switch to XLA's
# attention); the others run "xla", the same arithmetic without tracing the TPU branch.
CASES = [
    ("sam2_hiera_tiny", (128, 128), 2, "auto"),  # grids 32, 16, 8, 4; windows 8, 4, 14, 7
    ("sam2_hiera_tiny", (1024, 1024), 1, "xla"),  # SAM 2's size: 256, 128, 64 (pad 70), 32 (35)
    ("sam2_hiera_small", (128, 160), 2, "xla"),  # not square: 32x40 ... 4x5
    ("sam2_hiera_base_plus", (96, 128), 2, "xla"),  # its 14x14 table resized to 24x32
    ("sam2_hiera_large", (64, 64), 1, "xla"),  # windows 8, 4, 16, 8: 16, 8, 4 (pad 16), 2 (pad 8)
]


def _timm(name: str, seed: int = 0) -> torch.nn.Module:
    """A timm model with random weights (built on meta: no init to pay for)."""
    return randomise_hieradet(_timm_on_meta(name).to_empty(device="cpu"), seed)


def _timm_on_meta(name: str) -> torch.nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


@pytest.fixture(scope="module")
def reference():
    """`reference(name)` -> (timm model, converted params); the last two variants are kept."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            while len(cache) >= 2:
                cache.pop(next(iter(cache)))
            model = _timm(name, seed=NAMES.index(name))
            cache[name] = model, convert.convert_state_dict(model.state_dict(), name)
        return cache[name]

    yield get
    cache.clear()


def _forward(config, params, x):
    model = hieradet.HieraDet(config)
    run = jax.jit(lambda p, x: model.apply({"params": p}, x, return_intermediates=True))
    final, maps = run(params, x)
    return np.asarray(final), [np.asarray(m) for m in maps]


@pytest.mark.parametrize(
    "name,size,batch,kernel", CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES]
)
def test_trunk_matches_timm(reference, record_parity, name, size, batch, kernel):
    model, params = reference(name)
    x = random_input((batch, *size, 3), seed=size[0] + size[1])
    with torch.no_grad():
        final, maps = model.forward_intermediates(to_torch(x), output_fmt="NHWC")
    config = hieradet.get_config(name, input_size=size, attention_kernel=kernel)
    grids = config.stage_grids(size)
    assert [tuple(m.shape[1:3]) for m in maps] == list(grids)
    assert any(g % w for grid, w in zip(grids, config.window_spec) for g in grid)  # padded
    ours, our_maps = _forward(config, params, x)
    label = f"{name} @{size}"
    assert record_parity(label, "timm", "final map", rel_err(ours, final.numpy())) < TOL
    assert len(our_maps) == len(maps) == len(config.stages)
    for stage, (a, b) in enumerate(zip(our_maps, maps)):
        err = rel_err(a, b.numpy())
        assert record_parity(label, "timm", f"stage {stage + 1} map", err) < TOL
    np.testing.assert_array_equal(our_maps[-1], ours)  # the final map is the last stage's


def test_variants_are_timm_constructors():
    """Every block's width, heads, window and pooling as timm builds them; full-size shapes."""
    for name in NAMES:
        model = _timm_on_meta(name)
        config = hieradet.VARIANTS[name]
        theirs = [
            (
                blk.dim,
                blk.dim_out,
                blk.attn.num_heads,
                blk.window_size[0],
                blk.q_stride and tuple(blk.q_stride),
            )
            for blk in model.blocks
        ]
        ours = [(s.dim, s.dim_out, s.heads, s.window, s.q_stride) for s in config.block_specs]
        assert ours == theirs, name
        assert config.global_pos_size == tuple(model.pos_embed.shape[2:]), name
        assert config.stage_ends == tuple(model.stage_ends), name
        assert config.stage_dims == tuple(f["num_chs"] for f in model.feature_info), name
        convert.check_state_dict(model.state_dict(), name)  # every tensor, every shape
        assert convert.infer_config(model.state_dict()) == config, name


def test_pos_embed_is_torch_bicubic_plus_tiled_window():
    """The background resize is torch's bicubic (up, down, non-square), the window tiled."""
    import torch.nn.functional as F

    rng = np.random.RandomState(0)
    for table, grid, side in [((7, 7), (64, 64), 8), ((14, 14), (8, 16), 8), ((7, 7), (24, 32), 4)]:
        background = rng.randn(1, 5, *table)
        window = rng.randn(1, 5, side, side)
        expected = F.interpolate(torch.from_numpy(background), size=grid, mode="bicubic")
        expected = expected + torch.from_numpy(window).tile(grid[0] // side, grid[1] // side)
        ours = hieradet.pos_embed(
            background.transpose(0, 2, 3, 1).astype(np.float32),
            window.transpose(0, 2, 3, 1).astype(np.float32),
            grid,
        )
        assert rel_err(ours, expected.numpy().transpose(0, 2, 3, 1)) < 1e-6


def _unrolled_positions(window, strides):
    """(y, x) of each token of a window in the unrolled order, by the formula written out:
    offsets (i_1, j_1, ..., i_k, j_k, r, c) from slowest to fastest; y = ((r·s_k + i_k)...)·s_1
    + i_1."""
    import itertools

    rh = window[0] // int(np.prod([s[0] for s in strides]))
    rw = window[1] // int(np.prod([s[1] for s in strides]))
    ranges = [range(n) for s in strides for n in s] + [range(rh), range(rw)]
    positions = []
    for offsets in itertools.product(*ranges):
        *pool, r, c = offsets
        y, x = r, c
        for k in reversed(range(len(strides))):
            y, x = y * strides[k][0] + pool[2 * k], x * strides[k][1] + pool[2 * k + 1]
        positions.append((y, x))
    return positions


@pytest.mark.parametrize(
    "window,strides",
    [((8, 8), ((2, 2), (2, 2))), ((8, 8), ()), ((4, 6), ((2, 3),)), ((8, 12), ((2, 2),))],
)
def test_unrolled_windows_order_tokens_for_every_pool(window, strides):
    """Blocks in the same windows keep x as each window's tokens, ordered so each pool is over
    leading chunks: the order is the formula's, rolling back restores the map, and a pool over
    the leading chunk is the map's max pool in the smaller windows."""
    grid = (16, 24)
    x = np.random.RandomState(0).randn(2, *grid, 5).astype(np.float32)
    tokens = np.asarray(hieradet.unroll_windows(x, window, strides))
    n_w = grid[1] // window[1]
    for index, (y, x_) in enumerate(_unrolled_positions(window, strides)):
        for w in (0, 3, tokens.shape[1] - 1):
            top, left = (w // n_w) * window[0], (w % n_w) * window[1]
            np.testing.assert_array_equal(tokens[:, w, index], x[:, top + y, left + x_])
    np.testing.assert_array_equal(hieradet.roll_windows(tokens, grid, window, strides), x)
    if strides:
        (sh, sw), rest = strides[0], strides[1:]
        pooled = tokens.reshape(*tokens.shape[:2], sh * sw, -1, 5).max(axis=2)
        small = (window[0] // sh, window[1] // sw)
        expected = hieradet.unroll_windows(hieradet.max_pool(x, (sh, sw)), small, rest)
        np.testing.assert_array_equal(pooled, expected)


def test_block_layouts_run_where_no_padding_is_needed():
    """Runs of blocks keep the windowed tokens only where the windows tile the map unpadded."""
    cfg = hieradet.get_config("sam2_hiera_base_plus", input_size=224)  # grids 56, 28, 14, 7
    layouts = hieradet.block_layouts(cfg.block_specs, cfg.token_grid((224, 224)))
    assert layouts[:3] == [((8, 8), ((2, 2), (2, 2)))] * 3  # stages 1-2: one run, both pools
    assert layouts[3:6] == [((4, 4), ((2, 2),))] * 3
    assert layouts[6:22] == [((14, 14), ((2, 2),))] * 16  # windows = the map; global blocks too
    assert layouts[22:] == [((7, 7), ())] * 2
    cfg = hieradet.get_config("sam2_hiera_tiny", input_size=1024)  # 256, 128, 64 (pad), 32 (pad)
    layouts = hieradet.block_layouts(cfg.block_specs, cfg.token_grid((1024, 1024)))
    specs = cfg.block_specs
    assert layouts[:4] == [((8, 8), ((2, 2), (2, 2)))] * 2 + [((4, 4), ((2, 2),))] * 2
    for spec, layout in zip(specs[4:], layouts[4:]):  # stage 3 on: 14- and 7-token windows pad
        assert (layout is None) == bool(spec.window), (spec, layout)
    assert [layouts[i] for i in cfg.global_att_blocks] == [((64, 64), ())] * 3


def test_export_round_trips_and_loads_into_timm(reference):
    model, params = reference("sam2_hiera_tiny")
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = convert.export_state_dict(params, "sam2_hiera_tiny")
    trunk = {k: v for k, v in theirs.items() if not k.startswith("head.")}
    assert exported.keys() == trunk.keys()
    for key, value in trunk.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    fresh = _timm_on_meta("sam2_hiera_tiny").to_empty(device="cpu")
    result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, False)
    assert not result.unexpected_keys
    assert all(k.startswith("head.") for k in result.missing_keys), result.missing_keys
    again = convert.convert_state_dict(exported, "sam2_hiera_tiny")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_sam2_checkpoint_keys(reference):
    """A SAM 2 checkpoint ({"model": ...}, image_encoder.trunk., mlp.layers.N) loads the same
    params; timm's own checkpoint_filter_fn reads our SAM 2 export back to timm's keys."""
    from timm.models.hieradet_sam2 import checkpoint_filter_fn

    model, params = reference("sam2_hiera_tiny")
    sam2 = convert.export_state_dict(params, "sam2_hiera_tiny", format="sam2")
    assert all(k.startswith("image_encoder.trunk.") for k in sam2)
    assert "image_encoder.trunk.blocks.0.mlp.layers.0.weight" in sam2
    filtered = checkpoint_filter_fn(sam2, prefix="image_encoder.trunk.")
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert filtered.keys() == trunk.keys()
    np.testing.assert_array_equal(
        filtered["blocks.3.mlp.fc2.weight"], trunk["blocks.3.mlp.fc2.weight"]
    )
    # The whole SAM 2 model's state dict: the neck, decoders and memory are not the trunk.
    others = {
        "image_encoder.neck.convs.0.conv.weight": np.zeros((256, 768, 1, 1), np.float32),
        "sam_mask_decoder.iou_token.weight": np.zeros((1, 256), np.float32),
        "maskmem_tpos_enc": np.zeros((7, 1, 1, 64), np.float32),
    }
    checkpoint = {"model": {**others, **{k: torch.from_numpy(v) for k, v in sam2.items()}}}
    jax.tree.map(np.testing.assert_array_equal, convert.convert_state_dict(checkpoint), params)
    assert convert.infer_config(checkpoint) == hieradet.VARIANTS["sam2_hiera_tiny"]
    # SAM 2's `Hiera` module on its own: no prefix, mlp.layers.N.
    bare = {k.removeprefix("image_encoder.trunk."): v for k, v in sam2.items()}
    jax.tree.map(
        np.testing.assert_array_equal, convert.convert_state_dict(bare, "sam2_hiera_tiny"), params
    )


def test_converter_rejects_what_does_not_fit():
    tiny = _timm_on_meta("sam2_hiera_tiny").state_dict()
    with pytest.raises(ValueError, match=r"does not fill: blocks_11/mlp/fc2/bias"):
        convert.check_state_dict(
            {k: v for k, v in tiny.items() if k != "blocks.11.mlp.fc2.bias"}, "sam2_hiera_tiny"
        )
    with pytest.raises(ValueError, match=r"no place for: blocks.3.attn.extra.weight"):
        convert.check_state_dict(
            {**tiny, "blocks.3.attn.extra.weight": tiny["blocks.3.attn.qkv.weight"]},
            "sam2_hiera_tiny",
        )
    with pytest.raises(ValueError, match=r"shape mismatches:\n  pos_embed -> pos_embed"):
        convert.check_state_dict(
            {**tiny, "pos_embed": torch.zeros(1, 96, 14, 14, device="meta")}, "sam2_hiera_tiny"
        )
    small = _timm_on_meta("sam2_hiera_small").state_dict()
    with pytest.raises(ValueError, match=r"tensor\(s\) the trunk has no place for: blocks.12"):
        convert.check_state_dict(small, "sam2_hiera_tiny")  # blocks 12 to 15, as timm keys
    with pytest.raises(ValueError, match="unknown HieraDet variant"):
        convert.check_state_dict(tiny, "sam2_hiera_huge")
    with pytest.raises(ValueError, match="format must be one of"):
        convert.export_state_dict({}, "sam2_hiera_tiny", format="hf")
    # Heads and windows leave no trace in the tensors: an unregistered shape needs them given.
    wide = {**tiny, "patch_embed.proj.weight": torch.zeros(64, 3, 7, 7, device="meta")}
    with pytest.raises(ValueError, match="num_heads, window_spec, global_att_blocks cannot"):
        convert.infer_config(wide)
    custom = convert.infer_config(
        wide, num_heads=2, window_spec=(8, 4, 14, 7), global_att_blocks=(5,)
    )
    assert custom.embed_dim == 64 and custom.stages == (1, 2, 7, 2) and custom.num_heads == 2


def test_bad_inputs_and_configs_are_value_errors():
    config = hieradet.get_config("sam2_hiera_tiny", input_size=64)
    model = hieradet.HieraDet(config)
    params = convert.abstract_params(config)

    def trace(shape):
        x = jax.ShapeDtypeStruct(shape, np.float32)
        return jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)

    assert trace((2, 96, 64, 3)).shape == (2, 3, 2, 768)
    with pytest.raises(ValueError, match=r"NHWC images \[B, H, W, 3\], got shape \(2, 64, 64, 4\)"):
        trace((2, 64, 64, 4))
    with pytest.raises(ValueError, match="NHWC images"):
        trace((64, 64, 3))
    with pytest.raises(ValueError, match=r"\(16, 16\) pixels gives a \(4, 4\) token grid"):
        trace((1, 16, 16, 3))  # too small for one 8x8 window of tokens
    with pytest.raises(ValueError, match="multiple of 32x32 pixels"):
        trace((1, 100, 100, 3))
    bad = [
        (dict(window_spec=(8, 4, 14)), "one window per stage"),
        (dict(window_spec=(0, 4, 14, 7)), r"window_spec\[0\] must be >= 1"),
        (dict(global_att_blocks=(12,)), r"block indices in \[0, 12\)"),
        (dict(q_pool=4), r"q_pool=4 must be in \[0, 3\]"),
        (dict(embed_dim=100, num_heads=3), "cannot split into 3 heads"),
        (dict(dim_mul=1.0), "pools queries but keeps its width"),
        (dict(window_spec=(7, 4, 14, 7)), r"pools \(2, 2\) inside windows of 7"),
        (dict(input_size=(100, 100)), "multiple of 32x32"),
        (dict(in_chans=0), "in_chans must be positive integers"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(attention_kernel="cuda"), "attention_kernel"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            hieradet.get_config("sam2_hiera_tiny", **overrides)
    with pytest.raises(ValueError, match="unknown HieraDet variant"):
        hieradet.get_config("sam2_hiera_huge")
    listed = hieradet.HieraDetConfig(
        stages=[1, 2, 7, 2], global_att_blocks=[5, 7, 9], input_size=1024
    )
    assert listed == hieradet.VARIANTS["sam2_hiera_tiny"]  # lists become tuples, an int a square


def test_tpu_kernels_interpreted_match_timm_and_xla_gradients(reference, record_parity):
    """`attention_kernel="pallas"`, `mlp_kernel="pallas"`: the TPU programs' kernels (Hiera's
    token attention, one batch row per window, pooling blocks included; norm2 + MLP + residual)
    in Pallas' interpreter, against timm's forward and XLA's gradients."""
    model, params = reference("sam2_hiera_tiny")
    x = random_input((1, 64, 64, 3), seed=11)
    with torch.no_grad():
        final, _ = model.forward_intermediates(to_torch(x), output_fmt="NHWC")
    kernels = dict(attention_kernel="pallas", mlp_kernel="pallas")
    config = hieradet.get_config("sam2_hiera_tiny", input_size=(64, 64), **kernels)
    ours, _ = _forward(config, params, x)
    err = rel_err(ours, final.numpy())
    assert record_parity("sam2_hiera_tiny @(64, 64)", "timm", "final map, TPU kernels", err) < TOL

    def grads(kernel):
        trunk = hieradet.HieraDet(config.replace(attention_kernel=kernel, mlp_kernel=kernel))
        return jax.jit(jax.grad(lambda p: (trunk.apply({"params": p}, x) ** 2).mean()))(params)

    for a, b in zip(jax.tree.leaves(grads("pallas")), jax.tree.leaves(grads("xla")), strict=True):
        assert rel_err(a, b) < TOL
