"""Model structure, shapes, jit behaviour and input errors (no PyTorch forward passes here)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import official_on_meta

import hiera_jax
from hiera_jax import HieraConfig, HieraForImageClassification, HieraForPreTraining, HieraModel
from hiera_jax.models.factory import init_params
from hiera_jax.weights.convert import abstract_params, flax_to_official, model_type_for

# A small model with the full structure (4 stages, 3 unrolls, 16 mask units) that runs in ms.
SMALL = HieraConfig(
    input_size=(128, 128),
    embed_dim=16,
    num_heads=1,
    num_classes=7,
    stages=(1, 1, 2, 1),
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)
SMALL_MAE = SMALL.replace(q_pool=2, mask_ratio=0.5)


def _shapes_as_official(name: str) -> dict[str, tuple[int, ...]]:
    cfg = hiera_jax.get_config(name)
    flat = flax.traverse_util.flatten_dict(abstract_params(cfg, model_type_for(name, None)))
    out = {}
    for path, leaf in flat.items():
        key, value = flax_to_official(path, np.broadcast_to(np.float32(0), leaf.shape))
        out[key] = tuple(value.shape)
    return out


@pytest.mark.parametrize("name", hiera_jax.list_models())
def test_parameters_match_the_official_model_key_for_key(name):
    """Every official variant: same tensors, same shapes (after layout change), same count."""
    official = {k: tuple(v.shape) for k, v in official_on_meta(name).state_dict().items()}
    assert _shapes_as_official(name) == official


def test_create_model_returns_the_right_module():
    assert isinstance(hiera_jax.create_model("hiera_tiny_224"), HieraForImageClassification)
    mae = hiera_jax.create_model("mae_hiera_tiny_224")
    assert isinstance(mae, HieraForPreTraining) and mae.config.q_pool == 2


def test_classifier_backbone_and_mae_shapes():
    key = jax.random.key(0)
    x = jnp.ones((2, 128, 128, 3))
    cls = HieraForImageClassification(SMALL)
    params = init_params(cls, key)
    assert jax.jit(cls.apply)({"params": params}, x).shape == (2, 7)

    backbone = HieraModel(SMALL)
    apply = jax.jit(backbone.apply, static_argnames="return_intermediates")
    out = apply({"params": init_params(backbone, key)}, x, return_intermediates=True)
    assert out.pooler_output.shape == (2, 128)
    assert out.last_hidden_state.shape == (2, 16, 128)
    assert [m.shape for m in out.feature_maps] == [
        (2, 32, 32, 16),
        (2, 16, 16, 32),
        (2, 8, 8, 64),
        (2, 4, 4, 128),
    ]

    mae = HieraForPreTraining(SMALL_MAE)
    mae_params = init_params(mae, key)
    loss, pred, label, mask = jax.jit(mae.apply)({"params": mae_params}, x, rngs={"mask": key})
    # 16 mask units, 8 kept; each unit is 2x2 prediction tokens of 16x16x3 pixels.
    assert mask.shape == (2, 16) and mask.dtype == jnp.bool_
    assert np.all(np.asarray(mask).sum(1) == 8)
    assert pred.shape == label.shape == (2 * 8 * 4, 16 * 16 * 3)
    assert loss.shape == () and np.isfinite(float(loss))


def test_mae_jits_once_per_mask_ratio():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 128, 128, 3), jnp.float32)
    traces = []

    def make_step(model):
        def loss_fn(params, x, key):
            traces.append(model.config.mask_ratio)
            return model.apply({"params": params}, x, train=True, rngs={"mask": key})[0]

        return jax.jit(jax.value_and_grad(loss_fn))

    for ratio in (0.5, 0.75):
        model = HieraForPreTraining(SMALL_MAE.replace(mask_ratio=ratio))
        params = init_params(model, jax.random.key(0))
        step = make_step(model)
        losses = [float(step(params, x, jax.random.key(seed))[0]) for seed in range(3)]
        assert len(set(losses)) == 3  # new masks each call, no retrace
    assert traces == [0.5, 0.75]


def test_given_mask_is_used_and_wrong_counts_are_errors():
    model = HieraForPreTraining(SMALL_MAE)
    params = init_params(model, jax.random.key(0))
    x = jnp.asarray(np.random.RandomState(1).randn(2, 128, 128, 3), jnp.float32)
    mask = np.zeros((2, 16), bool)
    mask[:, :8] = True
    mask[1] = mask[1][::-1]
    _, _, _, used = jax.jit(model.apply)({"params": params}, x, mask=mask)
    np.testing.assert_array_equal(np.asarray(used), mask)

    bad = mask.copy()
    bad[0, 10] = True
    with pytest.raises(ValueError, match="keep exactly 8 of 16"):
        model.apply({"params": params}, x, mask=bad)
    with pytest.raises(ValueError, match=r"mask must have shape .*\(2, 16\)"):
        model.apply({"params": params}, x, mask=mask[:, :15])
    # Under jit the count cannot raise; the loss is poisoned instead of silently wrong.
    loss = jax.jit(lambda p, x, m: model.apply({"params": p}, x, mask=m)[0])(params, x, bad)
    assert np.isnan(float(loss))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 128, 128), "expected input of rank 4"),
        ((2, 3, 128, 128), r"looks channels-first \[B, C, H, W\].*x\.transpose\(0, 2, 3, 1\)"),
        ((2, 3, 96, 96), r"x\.transpose\(0, 2, 3, 1\); the model also expects size \(128, 128\)"),
        ((2, 96, 96, 3), "expected input size \\(128, 128\\)"),
        ((2, 128, 128, 1), "expected 3 channels"),
    ],
)
def test_bad_image_inputs_raise(shape, message):
    model = HieraForImageClassification(SMALL)
    with pytest.raises(ValueError, match=message):  # raised while tracing, before any compute
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def test_bad_video_input_raises():
    cfg = hiera_jax.get_config("hiera_base_16x224", input_size=(4, 64, 64))
    model = HieraForImageClassification(cfg)
    with pytest.raises(ValueError, match=r"rank 5 \[B, T, H, W, C\]"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def test_drop_path_is_random_in_training_only():
    cfg = SMALL.replace(drop_path_rate=0.5)
    model = HieraForImageClassification(cfg)
    params = init_params(model, jax.random.key(0))
    x = jnp.asarray(np.random.RandomState(2).randn(4, 128, 128, 3), jnp.float32)
    apply = jax.jit(model.apply, static_argnames="train")
    train = [
        apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(s)})
        for s in (0, 1)
    ]
    assert not np.allclose(train[0], train[1])
    eval_out = apply({"params": params}, x)
    no_drop = jax.jit(HieraForImageClassification(SMALL).apply)({"params": params}, x)
    np.testing.assert_array_equal(eval_out, no_drop)


def test_remat_changes_nothing_but_memory():
    x = jnp.asarray(np.random.RandomState(3).randn(2, 128, 128, 3), jnp.float32)
    mask = jnp.asarray(np.random.RandomState(3).permutation(32).reshape(2, 16) % 2 == 0)
    plain = HieraForPreTraining(SMALL_MAE)
    remat = HieraForPreTraining(SMALL_MAE.replace(remat=True))
    params = init_params(plain, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(remat, jax.random.key(0)))

    def grads(model):
        return jax.jit(
            jax.value_and_grad(lambda p: model.apply({"params": p}, x, mask=mask, train=True)[0])
        )(params)

    (loss_a, grad_a), (loss_b, grad_b) = grads(plain), grads(remat)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    model = HieraForImageClassification(SMALL)
    params = init_params(model, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jnp.asarray(np.random.RandomState(4).randn(2, 128, 128, 3), jnp.float32)
    f32 = jax.jit(model.apply)({"params": params}, x)
    bf16_model = HieraForImageClassification(SMALL.replace(dtype="bfloat16"))
    bf16 = jax.jit(bf16_model.apply)({"params": params}, x)
    assert bf16.dtype == jnp.float32  # logits are returned in float32
    err = float(jnp.abs(bf16 - f32).max() / jnp.abs(f32).max())
    assert 0 < err < 5e-2, err


def test_mae_without_mask_or_rng_says_what_to_pass():
    model = HieraForPreTraining(SMALL_MAE)
    with pytest.raises(ValueError, match=r"pass mask=\.\.\., noise=\.\.\. or rngs=\{'mask': key\}"):
        jax.eval_shape(
            lambda: model.apply(
                {"params": abstract_params(SMALL_MAE, "pretraining")}, jnp.zeros((1, 128, 128, 3))
            )
        )


def test_masking_with_mask_units_other_than_the_unrolled_windows_is_refused():
    # 3 stages unroll twice: windows of 4x4 tokens, so 8x8 mask units cannot be dropped.
    cfg = SMALL_MAE.replace(stages=(1, 1, 1), mask_unit_attn=(True, False, False), q_pool=1)
    model = HieraForPreTraining(cfg)
    with pytest.raises(ValueError, match=r"masking needs mask_unit_size == .* \(4, 4\)"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
    ok = cfg.replace(mask_unit_size=(4, 4), mask_ratio=0.75)
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    x = jnp.zeros((1, 128, 128, 3))
    shapes = jax.eval_shape(lambda: HieraForPreTraining(ok).init(rngs, x))
    assert "decoder_pred" in shapes["params"]
