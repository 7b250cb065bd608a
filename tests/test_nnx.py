"""`hiera_jax.nnx`: the models as NNX modules, equal to the Linen models; an NNX model built
around a Hiera backbone trains on the digits; the weights go back to Linen and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from helpers.reference import rel_err

import hiera_jax
import hiera_jax.nnx as hnnx
from hiera_jax.inference import Predictor

TINY = dict(embed_dim=8, image_size=[64, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1])


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)


@pytest.mark.parametrize(
    "cls", [hnnx.HieraModel, hnnx.HieraForImageClassification, hnnx.HieraBackbone],
    ids=lambda c: c.__name__,
)  # fmt: skip
def test_numbers_equal_the_linen_model(cls, x):
    model = cls(hiera_jax.HieraConfig(**TINY, num_labels=3), rngs=nnx.Rngs(1))
    linen = model.linen.to_nnx__module
    expected = linen.apply({"params": model.linen_params()}, x, output_hidden_states=True)
    got = model(x, output_hidden_states=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # split / merge, and nnx.jit, give the same numbers
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    jitted = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(merged, x)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_mae_draws_its_mask_from_its_rngs(x):
    config = hiera_jax.HieraConfig(
        **TINY, decoder_hidden_size=8, decoder_depth=1, decoder_num_heads=1
    )
    model = hnnx.HieraForPreTraining(config, rngs=nnx.Rngs(0, mask=5))
    noise = np.random.RandomState(1).rand(2, 4).astype(np.float32)
    loss, *_ = model(x, noise=noise)
    hf = model.to_hiera_jax()  # the same weights as the transformers-style class
    np.testing.assert_allclose(
        float(loss), float(hf(np.moveaxis(np.asarray(x), -1, 1), noise=noise).loss), rtol=1e-6
    )
    masks = {tuple(np.asarray(model(x)[3]).ravel()) for _ in range(6)}
    assert len(masks) > 1  # a new mask each call: the stream advances


def test_weights_round_trip_to_linen_and_transformers(tmp_path, x):
    model = hnnx.HieraForImageClassification(
        hiera_jax.HieraConfig(**TINY, num_labels=3), rngs=nnx.Rngs(2)
    )
    linen_params = model.linen_params()
    again = hnnx.HieraForImageClassification(model.config, params=linen_params)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))
    model.save_pretrained(tmp_path)
    theirs = transformers.HieraForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = theirs(torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1))).logits.numpy()
    assert rel_err(np.asarray(model(x)), logits) < 1e-4
    loaded = hnnx.HieraForImageClassification.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    with pytest.raises(ValueError, match="do not fit"):
        model.load_linen_params({"head": linen_params["head"]})


def test_sam2_image_encoder_equals_the_family_features():
    encoder = hnnx.SAM2ImageEncoder.random("sam2_hiera_tiny", input_size=(256, 256))
    predictor = Predictor.random("sam2_hiera_tiny", input_size=(256, 256))
    x = np.random.RandomState(3).randn(1, 256, 256, 3).astype(np.float32)
    ours = encoder(jnp.asarray(x))
    live = predictor.features(x, preprocessed=True)
    assert sorted(ours) == sorted(live)
    for name, value in live.items():
        np.testing.assert_allclose(np.asarray(ours[name]), value, rtol=1e-5, atol=1e-5)


class DigitClassifier(nnx.Module):
    """A small NNX model: a Hiera backbone (from hiera_jax.nnx) and an NNX head."""

    def __init__(self, rngs: nnx.Rngs):
        config = hiera_jax.HieraConfig(
            embed_dim=16, image_size=[32, 32], num_channels=1, depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2], mlp_ratio=2.0,
        )  # fmt: skip
        self.backbone = hnnx.HieraModel(config, rngs=rngs)
        self.head = nnx.Linear(config.hidden_size, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.backbone(x).pooler_output)


def test_an_nnx_model_with_a_hiera_backbone_trains_on_the_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((4, 4)))[..., None].astype(np.float32)
    images = (images - 0.5) / 0.5  # [N, 32, 32, 1]
    labels = digits.target.astype(np.int32)
    model = DigitClassifier(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.RandomState(0)
    losses = []
    for _ in range(30):
        idx = rng.choice(len(images), 64, replace=False)
        losses.append(float(step(model, optimizer, jnp.asarray(images[idx]), labels[idx])))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    # The trained backbone's weights are a Linen tree the Hugging Face-style class takes.
    trained = model.backbone.to_hiera_jax()
    np.testing.assert_array_equal(
        np.asarray(trained.params["patch_embed"]["proj"]["kernel"]),
        np.asarray(model.backbone.linen.patch_embed["proj"]["kernel"][...]),
    )
