"""Hidden states, attentions and noise-driven masks against Hugging Face `transformers` Hiera.

Random-weight HF models at small inputs (tiny at 64x64, the MAE at 128x128), converted with our
converter; every hidden state, rerolled hidden state and attention map is compared in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.reference import random_input, randomise_norms, rel_err, to_torch

import hiera_jax
from hiera_jax.models import masking

pytestmark = pytest.mark.reference
TOL = 1e-4
TINY = dict(embed_dim=96, depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8])


def _compare_states(ours, theirs, name, record_parity, label):
    assert len(ours) == len(theirs), (name, len(ours), len(theirs))
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        b = b.numpy()
        assert a.shape == b.shape, (name, i, a.shape, b.shape)
        worst = max(worst, rel_err(a, b))
    assert record_parity(label, "Hugging Face", name, worst) < TOL
    return worst


@pytest.fixture(scope="module")
def hf_backbone():
    from transformers import HieraConfig, HieraModel

    torch.manual_seed(3)
    hf = randomise_norms(HieraModel(HieraConfig(**TINY, image_size=[64, 64])).eval())
    config = hiera_jax.get_config("hiera_tiny_224", input_size=(64, 64))
    params = hiera_jax.convert_state_dict(hf.state_dict(), config, "hf", model_type="backbone")
    return hf, config, params


def test_backbone_hidden_states_and_attentions_match_hugging_face(hf_backbone, record_parity):
    hf, config, params = hf_backbone
    x = random_input((2, 64, 64, 3), seed=4)
    with torch.no_grad():
        ref = hf(to_torch(x), output_hidden_states=True, output_attentions=True)
    model = hiera_jax.HieraModel(config)
    apply = jax.jit(
        model.apply,
        static_argnames=("return_intermediates", "output_hidden_states", "output_attentions"),
    )
    out = apply({"params": params}, x, output_hidden_states=True, output_attentions=True)
    label = "hiera_tiny_224 @(64, 64) HieraModel"
    # Embeddings + one per stage, unrolled [B, N, C]; rerolled [B, H, W, C].
    assert [h.shape for h in out.hidden_states] == [
        (2, 256, 96),
        (2, 256, 96),
        (2, 64, 192),
        (2, 16, 384),
        (2, 4, 768),
    ]
    _compare_states(out.hidden_states, ref.hidden_states, "hidden_states", record_parity, label)
    _compare_states(
        out.reshaped_hidden_states,
        ref.reshaped_hidden_states,
        "reshaped_hidden_states",
        record_parity,
        label,
    )
    # Last block of each stage, [B, heads, windows, n_q, n_k].
    assert [a.shape for a in out.attentions] == [
        (2, 1, 4, 64, 64),
        (2, 2, 4, 16, 16),
        (2, 4, 1, 16, 16),
        (2, 8, 1, 4, 4),
    ]
    _compare_states(out.attentions, ref.attentions, "attentions", record_parity, label)
    for probs in out.attentions:
        np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    err = rel_err(out.pooler_output, ref.pooler_output.numpy())
    assert record_parity(label, "Hugging Face", "pooler_output", err) < TOL
    err = rel_err(out.last_hidden_state, ref.last_hidden_state.numpy())
    assert record_parity(label, "Hugging Face", "last_hidden_state", err) < TOL

    # The stage maps are the same arrays as return_intermediates gives.
    both = apply({"params": params}, x, return_intermediates=True, output_hidden_states=True)
    for fmap, state in zip(both.feature_maps, both.reshaped_hidden_states[1:]):
        np.testing.assert_array_equal(fmap, state)

    # Off by default: the same outputs as before, and no extra fields.
    plain = apply({"params": params}, x)
    assert plain.hidden_states is None and plain.attentions is None
    assert plain.reshaped_hidden_states is None
    np.testing.assert_array_equal(plain.last_hidden_state, out.last_hidden_state)


def test_classifier_hidden_states_match_hugging_face(record_parity):
    from transformers import HieraConfig, HieraForImageClassification

    torch.manual_seed(5)
    hf_config = HieraConfig(**TINY, image_size=[64, 64], num_labels=10)
    hf = randomise_norms(HieraForImageClassification(hf_config).eval())
    config = hiera_jax.get_config("hiera_tiny_224", input_size=(64, 64), num_classes=10)
    params = hiera_jax.convert_state_dict(hf.state_dict(), config, "hf")
    x = random_input((2, 64, 64, 3), seed=6)
    with torch.no_grad():
        ref = hf(to_torch(x), output_hidden_states=True, output_attentions=True)
    model = hiera_jax.HieraForImageClassification(config)
    logits, extras = model.apply(
        {"params": params}, x, output_hidden_states=True, output_attentions=True
    )
    assert set(extras) == {"hidden_states", "reshaped_hidden_states", "attentions"}
    label = "hiera_tiny_224 @(64, 64) classifier"
    assert record_parity(label, "Hugging Face", "logits", rel_err(logits, ref.logits.numpy())) < TOL
    for name in ("hidden_states", "reshaped_hidden_states", "attentions"):
        _compare_states(extras[name], getattr(ref, name), name, record_parity, label)

    # Only attentions, and together with return_features.
    logits2, extras = model.apply({"params": params}, x, output_attentions=True)
    assert set(extras) == {"attentions"}
    np.testing.assert_array_equal(logits2, logits)
    _, extras = model.apply({"params": params}, x, return_features=True, output_hidden_states=True)
    assert set(extras) == {"pooled", "feature_maps", "hidden_states", "reshaped_hidden_states"}
    # Default: plain logits, as before.
    assert isinstance(model.apply({"params": params}, x), jnp.ndarray)


def test_pretraining_noise_gives_hugging_face_mask_loss_logits_and_states(record_parity):
    from transformers import HieraConfig, HieraForPreTraining

    torch.manual_seed(7)
    hf_config = HieraConfig(
        **TINY,
        image_size=[128, 128],
        decoder_hidden_size=64,
        decoder_depth=2,
        decoder_num_heads=4,
        num_query_pool=2,
    )
    hf = randomise_norms(HieraForPreTraining(hf_config).eval())
    config = hiera_jax.get_config(
        "mae_hiera_tiny_224",
        input_size=(128, 128),
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    params = hiera_jax.convert_state_dict(hf.state_dict(), config, "hf", model_type="pretraining")
    x = random_input((2, 128, 128, 3), seed=8)
    noise = torch.rand(2, config.num_mask_units)  # 16 units, 6 kept
    with torch.no_grad():
        ref = hf(to_torch(x), noise=noise, output_hidden_states=True, output_attentions=True)
        ref_mask, _ = hf.hiera.embeddings.patch_embeddings.random_masking(to_torch(x), noise)

    model = hiera_jax.HieraForPreTraining(config)
    apply = jax.jit(
        model.apply,
        static_argnames=("return_reconstruction", "output_hidden_states", "output_attentions"),
    )
    loss, pred, label, mask, extras = apply(
        {"params": params},
        x,
        noise=noise.numpy(),
        return_reconstruction=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    np.testing.assert_array_equal(extras["visible"], ref.bool_masked_pos.numpy())
    name = "mae_hiera_tiny_224 @(128, 128)"
    assert record_parity(name, "Hugging Face", "loss", rel_err(loss, ref.loss.numpy())) < TOL
    err = rel_err(extras["pred"], ref.logits.numpy())
    assert record_parity(name, "Hugging Face", "logits (all tokens)", err) < TOL
    # Encoder states over the kept units only: [B, K·mu, C] and [B, K, *mu, C].
    assert extras["reshaped_hidden_states"][0].shape == (2, 6, 8, 8, 96)
    for key in ("hidden_states", "reshaped_hidden_states", "attentions"):
        _compare_states(extras[key], getattr(ref, key), key, record_parity, name)

    # The noise path and an explicit mask are the same computation.
    loss2, pred2, _, _ = apply({"params": params}, x, mask=np.asarray(mask))
    np.testing.assert_array_equal(loss2, loss)
    np.testing.assert_array_equal(pred2, pred)
    with pytest.raises(ValueError, match="either mask or noise"):
        model.apply({"params": params}, x, mask=np.asarray(mask), noise=noise.numpy())
    with pytest.raises(ValueError, match="noise must have shape"):
        model.apply({"params": params}, x, noise=np.zeros((2, 5), np.float32))


def test_mask_from_noise_is_the_hugging_face_rule():
    from transformers import HieraConfig
    from transformers.models.hiera.modeling_hiera import HieraPatchEmbeddings

    embed = HieraPatchEmbeddings(HieraConfig(**TINY), is_mae=True)
    noise = torch.rand(4, 49)
    ref, _ = embed.random_masking(torch.zeros(4, 3, 224, 224), noise)
    ours = masking.mask_from_noise(noise.numpy(), 19)
    np.testing.assert_array_equal(ours, ref.numpy())
    # Imposing a keep-mask through noise, as the HF docs suggest: noise = (~keep).float().
    keep = np.asarray(ours)
    np.testing.assert_array_equal(masking.mask_from_noise((~keep).astype(np.float32), 19), keep)


def test_states_with_remat_and_video():
    """Remat passes the attention flag through; video states are [B, T, H, W, C] maps."""
    config = hiera_jax.get_config(
        "hiera_base_16x224", input_size=(4, 64, 64), stages=(1, 1, 1, 1), remat=True
    )
    model = hiera_jax.HieraModel(config)
    params = hiera_jax.init_params(model, jax.random.key(0))
    x = random_input((1, 4, 64, 64, 3), seed=9)
    out = jax.jit(
        lambda p, x: model.apply(p, x, output_hidden_states=True, output_attentions=True)
    )({"params": params}, x)
    assert [h.shape for h in out.reshaped_hidden_states] == [
        (1, 2, 16, 16, 96),
        (1, 2, 16, 16, 96),
        (1, 2, 8, 8, 192),
        (1, 2, 4, 4, 384),
        (1, 2, 2, 2, 768),
    ]
    assert out.attentions[0].shape == (1, 1, 8, 64, 64)
    plain = jax.jit(lambda p, x: model.apply(p, x, return_intermediates=True))(
        {"params": params}, x
    )
    # Two programs: with attentions XLA's path keeps the probabilities; without, the path that
    # can take the attention kernel (hiera_jax.models.attention), which XLA fuses differently.
    for fmap, state in zip(plain.feature_maps, out.reshaped_hidden_states[1:]):
        np.testing.assert_allclose(fmap, state, rtol=1e-5, atol=1e-5)
