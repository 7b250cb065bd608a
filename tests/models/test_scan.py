"""`scan_blocks`: runs of identical blocks as one scan give the same parameters, outputs and
gradients as the blocks one by one, and are traced (so compiled) once per run."""

import dataclasses
import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiera_jax
from hiera_jax import HieraConfig, HieraForImageClassification, HieraForPreTraining, HieraModel
from hiera_jax.models import layers
from hiera_jax.models.factory import init_params
from hiera_jax.models.scan import use_scan

# Every stage has several blocks (runs of 2, 2, 3 and 1 after the first blocks) and a drop path.
SMALL = HieraConfig(
    input_size=(64, 64),
    embed_dim=16,
    num_heads=1,
    num_classes=7,
    stages=(2, 3, 4, 2),
    drop_path_rate=0.3,
    decoder_embed_dim=32,
    decoder_depth=3,
    decoder_num_heads=2,
)
SMALL_MAE = SMALL.replace(q_pool=2, mask_ratio=0.5)
RNGS = {"dropout": jax.random.key(7), "mask": jax.random.key(8)}


def test_automatic_scan_is_on_only_for_a_cpu(monkeypatch):
    """None (the default) scans on a CPU only: unrolled, GPU steps ran faster and TPU steps move
    fewer HBM bytes; True / False force it everywhere."""
    assert use_scan(SMALL) and SMALL.scan_blocks is None
    assert not use_scan(SMALL.replace(scan_blocks=False))
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert not use_scan(SMALL) and not use_scan(SMALL.replace(remat=True))
        assert use_scan(SMALL.replace(scan_blocks=True))


def _x(config: HieraConfig, batch: int = 2, seed: int = 1) -> jnp.ndarray:
    shape = (batch, *config.input_size, config.in_chans)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(a, b, tol=1e-5, name=""):
    """Same tree; every leaf within `tol` of the reference, relative to its largest entry."""
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    for path, x, y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(a), jax.tree.leaves(b)
    ):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert x.shape == y.shape, (name, path[0])
        scale = max(float(np.abs(y).max()), 1e-6)
        assert float(np.abs(x - y).max()) <= tol * scale, (name, jax.tree_util.keystr(path[0]))


def _value_and_grad(loss, model, params):
    """jit(value_and_grad(loss(model, .), has_aux=True))(params)."""
    return jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))(params)


def _apply(model, params, *args, **kwargs):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))(params, *args)


def _variants(cls, config, module_kwargs=None, **overrides):
    """(scan off, scan on) models of `cls`."""
    module_kwargs = module_kwargs or {}
    return (
        cls(config.replace(scan_blocks=False, **overrides), **module_kwargs),
        cls(config.replace(scan_blocks=True, **overrides), **module_kwargs),
    )


# ---------------------------------------------------------------------- runs
@pytest.mark.parametrize("name", hiera_jax.list_models(include_timm=True))
def test_block_runs_cover_every_block_within_stages(name):
    cfg = hiera_jax.get_config(name)
    runs = cfg.block_runs
    assert [i for start, stop in runs for i in range(start, stop)] == list(range(cfg.depth))
    stops = {stop - 1 for _, stop in runs}
    assert set(cfg.stage_ends) <= stops
    specs = cfg.block_specs
    for start, stop in runs:
        for i in range(start + 1, stop):  # the same block but for the drop-path rate
            assert specs[i] == dataclasses.replace(specs[start], drop_path=specs[i].drop_path)
            assert specs[i].dim == specs[i].dim_out and specs[i].q_stride == 1


def test_hiera_base_runs_are_the_stages_after_their_first_block():
    # The first stage changes nothing at its first block: both of its blocks are one run.
    assert hiera_jax.get_config("hiera_base_224").block_runs == (
        (0, 2),
        (2, 3),
        (3, 5),
        (5, 6),
        (6, 21),
        (21, 22),
        (22, 24),
    )


@functools.cache
def _params(cls, config: HieraConfig):
    """init_params(cls(config), key 0), once per test session (scan and remat do not change it)."""
    return init_params(cls(config), jax.random.key(0))


# ---------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "cls, config", [(HieraForImageClassification, SMALL), (HieraForPreTraining, SMALL_MAE)]
)
def test_init_is_the_same_tree_and_values_with_scan_on_and_off(cls, config):
    assert config.scan_blocks is None and use_scan(config)  # the default, on CPU
    p_off = init_params(cls(config.replace(scan_blocks=False)), jax.random.key(0))
    p_on = _params(cls, config)
    assert jax.tree.structure(p_on) == jax.tree.structure(p_off)
    for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    names = set(p_on)
    assert {f"blocks_{i}" for i in range(config.depth)} <= names
    assert not any("scan" in n or "stack" in n for n in names)
    if cls is HieraForPreTraining:
        assert {f"decoder_blocks_{i}" for i in range(config.decoder_depth)} <= names


# ---------------------------------------------------------------------- outputs and gradients
@functools.cache
def _classifier_step(config: HieraConfig):
    """(logits, grads) of a training forward (drop path live), and the eval logits."""
    model = HieraForImageClassification(config)
    params, x = _params(HieraForImageClassification, SMALL), _x(SMALL)

    def loss(model, params):
        logits = model.apply({"params": params}, x, train=True, rngs=RNGS)
        return jnp.sum(logits * jnp.arange(SMALL.num_classes)), logits

    (_, logits), grads = _value_and_grad(loss, model, params)
    return logits, grads, _apply(model, params, x)


@functools.cache
def _mae_step(config: HieraConfig):
    """((loss, pred, label, mask), grads) of an MAE training forward."""
    model = HieraForPreTraining(config)
    params, x = _params(HieraForPreTraining, SMALL_MAE), _x(SMALL_MAE)

    def loss(model, params):
        out = model.apply({"params": params}, x, train=True, rngs=RNGS)
        return out[0], out

    (_, out), grads = _value_and_grad(loss, model, params)
    return out, grads


@pytest.mark.parametrize("remat", [False, True])
def test_classifier_logits_and_gradients_match(remat):
    logits_off, g_off, eval_off = _classifier_step(SMALL.replace(scan_blocks=False))
    logits_on, g_on, eval_on = _classifier_step(SMALL.replace(scan_blocks=True, remat=remat))
    _close(logits_on, logits_off, name="logits")
    _close(g_on, g_off, tol=1e-4, name="grads")
    # The drop path was live (and dropped the same examples in both): eval differs.
    assert not np.allclose(np.asarray(eval_on), np.asarray(logits_on), atol=1e-7)
    _close(eval_on, eval_off, name="eval logits")


@pytest.mark.parametrize("remat", [False, True])
def test_mae_loss_pred_and_gradients_match(remat):
    out_off, g_off = _mae_step(SMALL_MAE.replace(scan_blocks=False))
    out_on, g_on = _mae_step(SMALL_MAE.replace(scan_blocks=True, remat=remat))
    _close(out_on[:3], out_off[:3], name="loss, pred, label")
    np.testing.assert_array_equal(np.asarray(out_on[3]), np.asarray(out_off[3]))  # the mask
    _close(g_on, g_off, tol=1e-4, name="grads")


@pytest.mark.parametrize("masked", [False, True])
def test_backbone_maps_hidden_states_and_attentions_match(masked):
    # The MAE's weights have no pooler norm: its encoder runs without the pooling layer.
    off, on = _variants(
        HieraModel, SMALL_MAE if masked else SMALL, {"add_pooling_layer": not masked}
    )
    config = off.config
    params = _params(HieraForPreTraining if masked else HieraForImageClassification, config)
    x = _x(config)
    mask = None
    if masked:
        mask = jnp.array([[True, False, True, False], [False, True, True, False]])
    kwargs = dict(return_intermediates=True, output_hidden_states=True, output_attentions=True)
    out_off, out_on = (_apply(m, params, x, mask, **kwargs) for m in (off, on))
    assert len(out_on.attentions) == len(config.stages)
    assert len(out_on.hidden_states) == len(config.stages) + 1
    _close(out_on, out_off, name="HieraModelOutput")
    # Without the attentions, the last block of a stage is inside the scan: still the same.
    plain_off, plain_on = (_apply(m, params, x, mask, return_intermediates=True) for m in (off, on))
    _close(plain_on, plain_off, name="feature maps")
    _close(plain_on.feature_maps, out_off.feature_maps, name="feature maps vs with states")


@pytest.mark.parametrize(
    "config",
    [
        # video: 3-D unroll, separate position embeddings
        hiera_jax.get_config(
            "hiera_base_16x224",
            input_size=(4, 64, 64),
            embed_dim=16,
            stages=(1, 3, 3, 2),
            num_classes=5,
            drop_path_rate=0.2,
        ),
        # timm abswin: LayerScale, pooled-concat widening, timm's jax init with fix_init rescale
        hiera_jax.get_config(
            "hiera_small_abswin_256", input_size=(64, 64), stages=(1, 2, 3, 2), num_classes=5
        ),
    ],
    ids=["video", "abswin"],
)
def test_other_block_options_match(config):
    off, on = _variants(HieraForImageClassification, config)
    params = init_params(off, jax.random.key(0))
    _close(init_params(on, jax.random.key(0)), params, tol=0.0, name="init")
    # Random head and LayerScale so the abswin logits are not zero.
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    x = _x(config)

    def loss(model, params):
        logits = model.apply({"params": params}, x, train=True, rngs=RNGS)
        return jnp.sum(logits**2), logits

    (_, out_off), g_off = _value_and_grad(loss, off, params)
    (_, out_on), g_on = _value_and_grad(loss, on, params)
    _close(out_on, out_off, name="logits")
    _close(g_on, g_off, tol=1e-4, name="grads")


def test_bfloat16_is_as_close_to_float32_with_the_scan():
    """bfloat16 rounds differently where XLA fuses differently: compare both to float32."""
    params, x = _params(HieraForImageClassification, SMALL), _x(SMALL)

    def pooled(model):
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))
        return np.asarray(apply(params, x)[1]["pooled"])

    ref = pooled(HieraForImageClassification(SMALL))
    off, on = _variants(HieraForImageClassification, SMALL, dtype="bfloat16")
    err_off = np.abs(pooled(off).astype(np.float32) - ref).max()
    err_on = np.abs(pooled(on).astype(np.float32) - ref).max()
    assert err_on < 0.05 * np.abs(ref).max()
    assert err_on < 1.5 * err_off + 1e-3, (err_on, err_off)


def test_missing_dropout_rng_still_raises():
    _, on = _variants(HieraForImageClassification, SMALL)
    params = _params(HieraForImageClassification, SMALL)
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda p, x: on.apply({"params": p}, x, train=True), params, _x(SMALL))


# ---------------------------------------------------------------------- traced once
@pytest.fixture
def block_traces(monkeypatch):
    """Names of the HieraBlock calls traced (None: the scan's template block)."""
    calls = []
    original = layers.HieraBlock.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layers.HieraBlock, "__call__", counting)
    return calls


@pytest.mark.parametrize("remat", [False, True])
def test_each_run_is_traced_once(block_traces, remat):
    # XLA's attention: the TPU kernels' own loops would show up as scans in the jaxpr too.
    off, on = _variants(HieraForPreTraining, SMALL_MAE, remat=remat, attention_kernel="xla")
    params = jax.eval_shape(lambda k: init_params(off, k), jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, *SMALL_MAE.input_size, 3), jnp.float32)

    def step(model):
        def loss(p, x):
            return model.apply({"params": p}, x, train=True, rngs=RNGS)[0]

        block_traces.clear()
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, x))
        return list(block_traces), jaxpr

    traced_off, jaxpr_off = step(off)
    assert not re.search(r"\bscan\[", jaxpr_off)
    assert len(traced_off) == SMALL_MAE.depth + SMALL_MAE.decoder_depth
    traced_on, jaxpr = step(on)
    # Stage runs (0,2) (2,3) (3,5) (5,6) (6,9) (9,10) (10,11): 3 scans, 4 single blocks, and one
    # scan for the 3 decoder blocks.
    scanned = [r for r in SMALL_MAE.block_runs if r[1] - r[0] >= 2]
    assert len(scanned) == 3
    assert len(traced_on) == len(SMALL_MAE.block_runs) + 1
    assert traced_on.count(None) == len(scanned) + 1
    # Forward and backward: one loop each per scan.
    assert len(re.findall(r"\bscan\[", jaxpr)) == 2 * (len(scanned) + 1)


def test_scanned_program_is_smaller():
    """hiera_tiny's 7-block stage: the compiled forward holds one block instead of six."""
    config = hiera_jax.get_config("hiera_tiny_224", input_size=(64, 64), embed_dim=16)
    off, on = _variants(HieraForImageClassification, config)
    params = jax.eval_shape(lambda k: init_params(off, k), jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    sizes = {}
    for name, model in (("off", off), ("on", on)):
        compiled = (
            jax.jit(lambda p, x, m=model: m.apply({"params": p}, x)).lower(params, x).compile()
        )
        sizes[name] = len(compiled.as_text())
    assert sizes["on"] < 0.75 * sizes["off"], sizes
