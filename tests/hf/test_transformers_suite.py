"""transformers' own tests for Hiera, ported to hiera_jax as a user of the docs page writes them.

The checks of `tests/models/hiera/test_modeling_hiera.py` (transformers 5.x) and of the mixins it
inherits (`ConfigTester`, `ModelTesterMixin`, `BackboneTesterMixin`), with the same tester config
(an 8-wide, one-block-per-stage Hiera at 64x64, batch 13), the same shapes, the same tolerances,
and the same way of changing the config between models (`config.num_labels = 10`, ...). Where a
check compares numbers with something, it is transformers' PyTorch model on the same weights.

Left out, with transformers' Flax models as the guide for what a JAX model has: torch-only checks
(torchscript, SDPA / flash attention, gradient checkpointing, `get_input_embeddings` returning an
`nn.Module`, `.to(device)`, fx tracing, pruning and head masking), and the pipelines mixin.
"""

import copy
import inspect
import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.reference import randomise_norms, rel_err
from transformers.backbone_utils import BackboneType

from hiera_jax import (
    HieraBackbone,
    HieraConfig,
    HieraForImageClassification,
    HieraForPreTraining,
    HieraModel,
)

pytestmark = pytest.mark.reference
ALL_MODEL_CLASSES = (HieraModel, HieraBackbone, HieraForImageClassification, HieraForPreTraining)
BATCH = 13
IMAGE = [64, 64]
DEPTHS = [1, 1, 1, 1]
HEADS = [1, 1, 1, 1]
EMBED = 8
LABELS = 10  # HieraModelTester.type_sequence_label_size
# HieraModelTester.get_config()
TESTER = dict(
    embed_dim=EMBED,
    image_size=IMAGE,
    patch_stride=[4, 4],
    patch_size=[7, 7],
    patch_padding=[3, 3],
    masked_unit_size=[8, 8],
    mlp_ratio=1.0,
    num_channels=3,
    depths=DEPTHS,
    num_heads=HEADS,
    embed_dim_multiplier=2.0,
    hidden_act="gelu",
    decoder_hidden_size=2,
    decoder_depth=1,
    decoder_num_heads=1,
    initializer_range=0.02,
)
# tests/utils/test_configuration_utils.py's config_common_kwargs (5.x), plus the common
# PretrainedConfig arguments the issue names.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "finetuning_task": "translation",
    "tie_word_embeddings": False,
    "is_decoder": True,
    "add_cross_attention": True,
    "tokenizer_class": "BertTokenizerFast",
    "prefix": "prefix",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
    "sep_token_id": 9,
    "decoder_start_token_id": 10,
    "task_specific_params": {"translation": "some_params"},
}


def prepare_config_and_inputs(seed=0):
    """HieraModelTester.prepare_config_and_inputs: floats_tensor pixels, ids_tensor labels."""
    rng = np.random.RandomState(seed)
    pixels = rng.random_sample((BATCH, 3, *IMAGE)).astype(np.float32)
    labels = rng.randint(0, LABELS, size=(BATCH,))
    return HieraConfig(**TESTER), pixels, labels


def prepare_config_and_inputs_for_common():
    config, pixels, _ = prepare_config_and_inputs()
    return config, {"pixel_values": pixels}


def prepare_for_class(inputs, model_class, return_labels=False):
    """ModelTesterMixin._prepare_for_class: labels for the classifier (zeros, as there)."""
    inputs = dict(inputs)
    if return_labels and model_class is HieraForImageClassification:
        inputs["labels"] = np.zeros(BATCH, dtype=np.int64)
    return inputs


def _np(x):
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


# ---------------------------------------------------------------------- ConfigTester
def test_config_to_json_string():
    config = HieraConfig(**TESTER)
    obj = json.loads(config.to_json_string())
    for key, value in TESTER.items():
        assert obj[key] == value, key


def test_config_to_json_file(tmp_path):
    first = HieraConfig(**TESTER)
    path = os.path.join(tmp_path, "config.json")
    first.to_json_file(path)
    second = HieraConfig.from_json_file(path)
    assert second.to_dict() == first.to_dict()


def test_config_from_and_save_pretrained():
    first = HieraConfig(**TESTER)
    with tempfile.TemporaryDirectory() as tmpdirname:
        first.save_pretrained(tmpdirname)
        second = HieraConfig.from_pretrained(tmpdirname)
    assert second.to_dict() == first.to_dict()
    with pytest.raises(OSError):
        HieraConfig.from_pretrained(f".{tmpdirname}")


def test_config_with_num_labels():
    config = HieraConfig(**TESTER, num_labels=5)
    assert len(config.id2label) == 5 and len(config.label2id) == 5
    config.num_labels = 3
    assert len(config.id2label) == 3 and len(config.label2id) == 3


def test_config_can_be_init_without_params():
    config = HieraConfig()
    assert config is not None
    # transformers' defaults, checked against transformers itself.
    theirs = transformers.HieraConfig()
    for key in ("num_labels", "decoder_hidden_size", "decoder_depth", "decoder_num_heads",
                "num_query_pool", "depths", "num_heads", "embed_dim", "image_size",
                "out_features", "out_indices", "id2label", "label2id"):  # fmt: skip
        ours, expected = getattr(config, key), getattr(theirs, key)
        if isinstance(expected, tuple):  # transformers keeps its tuple defaults
            expected = list(expected)
        if isinstance(ours, tuple):  # our sequence fields are tuples (hashable), README says
            ours = list(ours)
        assert ours == expected, key


def test_config_arguments_init():
    config = HieraConfig(**copy.deepcopy(CONFIG_COMMON_KWARGS))
    wrong = [(k, getattr(config, k), v) for k, v in CONFIG_COMMON_KWARGS.items()
             if getattr(config, k) != v]  # fmt: skip
    assert not wrong
    # and config.json keeps them, as transformers writes them
    theirs = json.loads(transformers.HieraConfig(**CONFIG_COMMON_KWARGS).to_json_string())
    ours = json.loads(config.to_json_string())
    for key in CONFIG_COMMON_KWARGS:
        if key != "dtype":  # ours: the compute dtype, kept under hiera_jax
            assert ours[key] == theirs[key], key
    assert HieraConfig.from_dict(ours) == config


# ---------------------------------------------------------------------- HieraModelTester
def test_model():
    config, pixels, _ = prepare_config_and_inputs()
    result = HieraModel(config=config)(pixels)
    tokens = [i // s for i, s in zip(IMAGE, config.patch_stride)]
    seq_len = math.prod(tokens) // math.prod(config.query_stride) ** config.num_query_pool
    dim = int(config.embed_dim * config.embed_dim_multiplier ** (len(config.depths) - 1))
    assert result.last_hidden_state.shape == (BATCH, seq_len, dim)


def test_backbone():
    config, pixels, _ = prepare_config_and_inputs()
    model = HieraBackbone(config=config)
    result = model(pixels)
    assert len(result.feature_maps) == len(config.out_indices)
    num_patches = config.image_size[0] // config.patch_stride[0] // config.masked_unit_size[0]
    assert list(result.feature_maps[0].shape) == [BATCH, model.channels[0], num_patches,
                                                  num_patches]  # fmt: skip
    assert len(model.channels) == len(config.out_indices)
    config.out_indices = None
    model = HieraBackbone(config=config)
    result = model(pixels)
    assert len(result.feature_maps) == 1
    assert list(result.feature_maps[0].shape) == [BATCH, model.channels[-1], num_patches,
                                                  num_patches]  # fmt: skip
    assert len(model.channels) == 1


def test_for_pretraining():
    config, pixels, _ = prepare_config_and_inputs()
    result = HieraForPreTraining(config=config)(pixels)
    pred_stride = config.patch_stride[-1] * (config.query_stride[-1] ** config.num_query_pool)
    num_patches = IMAGE[0] // pred_stride
    assert result.logits.shape == (BATCH, num_patches**2, 3 * pred_stride**2)
    config.num_channels = 1  # greyscale
    model = HieraForPreTraining(config)
    grey = np.random.RandomState(1).random_sample((BATCH, 1, *IMAGE)).astype(np.float32)
    assert model(grey).logits.shape == (BATCH, num_patches**2, pred_stride**2)


def test_for_image_classification():
    config, pixels, labels = prepare_config_and_inputs()
    config.num_labels = LABELS
    result = HieraForImageClassification(config)(pixels, labels=labels)
    assert result.logits.shape == (BATCH, LABELS)
    config.num_channels = 1
    model = HieraForImageClassification(config)
    grey = np.random.RandomState(1).random_sample((BATCH, 1, *IMAGE)).astype(np.float32)
    assert model(grey).logits.shape == (BATCH, LABELS)


# ---------------------------------------------------------------------- HieraModelTest
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_attention_outputs(model_class):
    config, inputs = prepare_config_and_inputs_for_common()
    config.return_dict = True
    inputs["output_attentions"] = True
    inputs["output_hidden_states"] = False
    outputs = model_class(config)(**prepare_for_class(inputs, model_class))
    assert len(outputs.attentions) == len(DEPTHS)

    # output_attentions from the config
    del inputs["output_attentions"]
    config.output_attentions = True
    seq_len = math.prod([i // s for i, s in zip(config.image_size, config.patch_stride)])
    mask_unit_area = math.prod(config.masked_unit_size)
    num_windows = seq_len // mask_unit_area
    if model_class is HieraForPreTraining:
        num_windows = int(num_windows * (1 - config.mask_ratio))
        seq_len = int(num_windows * mask_unit_area)
    outputs = model_class(config)(**prepare_for_class(inputs, model_class))
    assert len(outputs.attentions) == len(DEPTHS)
    expected = [HEADS[0], num_windows, mask_unit_area, seq_len // num_windows]
    assert list(outputs.attentions[0].shape[-4:]) == expected
    out_len = len(outputs)

    # attentions last, and the order kept
    inputs["output_attentions"] = True
    inputs["output_hidden_states"] = True
    outputs = model_class(config)(**prepare_for_class(inputs, model_class))
    added_hidden_states = 1 if model_class is HieraBackbone else 2  # + reshaped_hidden_states
    assert out_len + added_hidden_states == len(outputs)
    assert len(outputs.attentions) == len(DEPTHS)
    assert list(outputs.attentions[0].shape[-4:]) == expected


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_hidden_states_output(model_class):
    def check(inputs, config):
        outputs = model_class(config)(**prepare_for_class(inputs, model_class))
        hidden_states = outputs.hidden_states
        assert len(hidden_states) == len(DEPTHS) + 1
        num_patches = (IMAGE[1] // config.patch_stride[1]) * (IMAGE[0] // config.patch_stride[0])
        if model_class is HieraForPreTraining:
            mask_unit_area = math.prod(config.masked_unit_size)
            num_windows = int(num_patches // mask_unit_area * (1 - config.mask_ratio))
            num_patches = int(num_windows * mask_unit_area)
        assert list(hidden_states[0].shape[-2:]) == [num_patches, EMBED]
        if model_class is not HieraBackbone:
            reshaped = outputs.reshaped_hidden_states
            assert len(reshaped) == len(DEPTHS) + 1
            first = np.asarray(reshaped[0])
            first = first.reshape(first.shape[0], -1, first.shape[-1])
            assert list(first.shape[-2:]) == [num_patches, EMBED]

    config, inputs = prepare_config_and_inputs_for_common()
    inputs["output_hidden_states"] = True
    check(inputs, config)
    del inputs["output_hidden_states"]
    config.output_hidden_states = True  # from the config
    check(inputs, config)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_model_outputs_equivalence(model_class):
    config, inputs = prepare_config_and_inputs_for_common()
    model = model_class(config)

    def check_equivalence(tuple_inputs, dict_inputs, extra):
        key = jax.random.key(0)  # the same mask for both calls of the MAE
        kw = {"mask_rng": key} if model_class in (HieraForPreTraining,) else {}
        tuple_output = model(**tuple_inputs, return_dict=False, **extra, **kw)
        dict_output = model(**dict_inputs, return_dict=True, **extra, **kw).to_tuple()

        def recursive_check(a, b):
            if isinstance(a, (list, tuple)):
                assert len(a) == len(b)
                for x, y in zip(a, b):
                    recursive_check(x, y)
            elif isinstance(a, dict):
                for x, y in zip(a.values(), b.values()):
                    recursive_check(x, y)
            elif a is None:
                assert b is None
            else:
                a, b = (
                    np.nan_to_num(np.asarray(a, np.float32)),
                    np.nan_to_num(np.asarray(b, np.float32)),
                )
                np.testing.assert_allclose(a, b, atol=1e-5)

        recursive_check(tuple_output, dict_output)

    for extra in ({}, {"output_hidden_states": True}, {"output_attentions": True},
                  {"output_attentions": True, "output_hidden_states": True}):  # fmt: skip
        for labels in (False, True):
            check_equivalence(
                prepare_for_class(inputs, model_class, labels),
                prepare_for_class(inputs, model_class, labels),
                extra,
            )


# ---------------------------------------------------------------------- ModelTesterMixin
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_forward_signature(model_class):
    names = list(inspect.signature(model_class.__call__).parameters)[1:]
    assert names[:1] == ["pixel_values"]
    assert model_class.main_input_name == "pixel_values"  # test_model_main_input_name


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_save_load(model_class, tmp_path):
    config, inputs = prepare_config_and_inputs_for_common()
    model = model_class(config)
    kw = {}
    if model_class is HieraForPreTraining:
        kw = {"noise": np.random.RandomState(2).rand(BATCH, 4).astype(np.float32)}
    first = model(**inputs, **kw)[0]
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path)
    second = loaded(**inputs, **kw)[0]
    assert np.abs(np.asarray(first) - np.asarray(second)).max() <= 1e-5
    assert loaded.config == model.config


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_determinism(model_class):
    config, inputs = prepare_config_and_inputs_for_common()
    model = model_class(config)
    kw = {"mask_rng": jax.random.key(3)} if model_class is HieraForPreTraining else {}
    first, second = (np.asarray(model(**inputs, **kw)[0]) for _ in range(2))
    assert np.abs(first - second).max() <= 1e-5


@pytest.mark.parametrize("model_class", [HieraForImageClassification, HieraForPreTraining],
                         ids=lambda c: c.__name__)  # fmt: skip
def test_training(model_class):
    """The model in training mode gives a loss whose gradient reaches every parameter."""
    config, inputs = prepare_config_and_inputs_for_common()
    config.return_dict = True
    model = model_class(config)
    inputs = prepare_for_class(inputs, model_class, return_labels=True)

    def loss(params):
        out = model(**inputs, params=params, train=True, dropout_rng=jax.random.key(1),
                    **({"mask_rng": jax.random.key(2)} if model_class is HieraForPreTraining
                       else {}))  # fmt: skip
        return out.loss

    value, grads = jax.value_and_grad(loss)(model.params)
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) >= 0.9 * len(leaves)


@pytest.mark.parametrize(
    "problem_type, num_labels, dtype",
    [
        ("multi_label_classification", 2, np.float32),
        ("single_label_classification", 1, np.int64),
        ("regression", 1, np.float32),
    ],  # fmt: skip
)
def test_problem_types(problem_type, num_labels, dtype):
    config, inputs = prepare_config_and_inputs_for_common()
    config.problem_type = problem_type
    config.num_labels = num_labels
    model = HieraForImageClassification(config)
    labels = prepare_for_class(inputs, HieraForImageClassification, True)["labels"]
    if problem_type == "multi_label_classification":
        labels = np.repeat(labels[:, None], num_labels, axis=1)
    out = model(**inputs, labels=labels.astype(dtype))
    assert np.isfinite(float(out.loss))
    if problem_type == "single_label_classification":  # a class the head does not have
        with pytest.raises(ValueError, match=r"class indices in \[0, 1\)"):
            model(**inputs, labels=np.ones(BATCH, dtype))


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_batching_equivalence(model_class):
    """ModelTesterMixin.test_batching_equivalence: row 0 of a batch equals a batch of one."""
    config, inputs = prepare_config_and_inputs_for_common()
    model = model_class(config)
    pixels = inputs["pixel_values"]
    kw_batched, kw_single = {}, {}
    if model_class is HieraForPreTraining:
        noise = np.random.RandomState(4).rand(BATCH, 4).astype(np.float32)
        kw_batched, kw_single = {"noise": noise}, {"noise": noise[:1]}
    batched = model(pixels, output_hidden_states=True, **kw_batched)
    single = model(pixels[:1], output_hidden_states=True, **kw_single)
    for name in ("last_hidden_state", "pooler_output", "logits", "feature_maps", "hidden_states"):
        if name not in batched.keys():
            continue
        a, b = batched[name], single[name]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x)[:1], np.asarray(y)
            assert np.abs(x - y).max() <= 1e-5 * max(1.0, np.abs(y).max()), name


def test_load_with_mismatched_shapes(tmp_path):
    config, inputs = prepare_config_and_inputs_for_common()
    config.num_labels = LABELS
    HieraForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError):
        HieraForImageClassification.from_pretrained(tmp_path, num_labels=42)
    with pytest.warns(UserWarning, match="shapes did not match"):
        new = HieraForImageClassification.from_pretrained(
            tmp_path, num_labels=42, ignore_mismatched_sizes=True
        )
    assert new(**inputs).logits.shape == (BATCH, 42)
    # The base model loads from the classifier's directory, without the head.
    assert HieraModel.from_pretrained(tmp_path)(**inputs).last_hidden_state.shape[0] == BATCH


# ---------------------------------------------------------------------- against transformers
def _torch_pair(model_class, tmp_path, **changes):
    """transformers' model of the tester config (random weights and norms) and ours, loaded
    from the directory transformers saved it into."""
    torch.manual_seed(0)
    theirs = getattr(transformers, model_class.__name__)(
        transformers.HieraConfig(**TESTER, **changes)
    )
    randomise_norms(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    return theirs, model_class.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "model_class",
    [HieraModel, HieraForImageClassification, HieraForPreTraining],
    ids=lambda c: c.__name__,
)
def test_numbers_match_transformers(model_class, tmp_path):
    """The tester's models, called as the tests call them, give transformers' numbers."""
    changes = {"num_labels": LABELS} if model_class is HieraForImageClassification else {}
    theirs, ours = _torch_pair(model_class, tmp_path, **changes)
    _, inputs = prepare_config_and_inputs_for_common()
    pixels = inputs["pixel_values"]
    kw = {}
    if model_class is HieraForPreTraining:
        kw = {"noise": np.random.RandomState(5).rand(BATCH, 4).astype(np.float32)}
    with torch.no_grad():
        expected = theirs(torch.from_numpy(pixels), output_hidden_states=True,
                          output_attentions=True,
                          **{k: torch.from_numpy(v) for k, v in kw.items()})  # fmt: skip
    got = ours(pixels, output_hidden_states=True, output_attentions=True, **kw)
    main = "logits" if model_class is not HieraModel else "last_hidden_state"
    assert rel_err(got[main], _np(expected[main])) < 1e-4
    for name in ("hidden_states", "reshaped_hidden_states", "attentions"):
        for a, b in zip(got[name], expected[name], strict=True):
            assert rel_err(a, _np(b)) < 1e-4, name
    if model_class is HieraForPreTraining:
        assert rel_err(got.loss, _np(expected.loss)) < 1e-4
        np.testing.assert_array_equal(np.asarray(got.bool_masked_pos),
                                      _np(expected.bool_masked_pos))  # fmt: skip


# ---------------------------------------------------------------------- BackboneTesterMixin
def test_backbone_config():
    config = HieraConfig()
    expected = ["stem"] + [f"stage{idx}" for idx in range(1, len(config.depths) + 1)]
    assert config.stage_names == expected
    assert set(config.out_features).issubset(set(config.stage_names))
    config = HieraConfig(out_features=None, out_indices=None)
    assert config.out_features == [config.stage_names[-1]]
    assert config.out_indices == [len(config.stage_names) - 1]
    config = HieraConfig(out_features=["stem", "stage1"], out_indices=[0, 1])
    assert (config.out_features, config.out_indices) == (["stem", "stage1"], [0, 1])
    config = HieraConfig(out_features=["stage1", "stage3"])
    assert (config.out_features, config.out_indices) == (["stage1", "stage3"], [1, 3])
    config = HieraConfig(out_indices=[0, 2])
    assert config.out_features == [config.stage_names[0], config.stage_names[2]]
    assert config.out_indices == [0, 2]
    with pytest.raises(ValueError):
        HieraConfig(out_features=["stage1", "stage2"], out_indices=[0, 2])


def test_backbone_channels():
    config, _ = prepare_config_and_inputs_for_common()
    model = HieraBackbone(config)
    assert len(model.channels) == len(config.out_features)
    num_features = model.num_features
    out_indices = [config.stage_names.index(feat) for feat in config.out_features]
    assert model.channels == [num_features[idx] for idx in out_indices]
    for name in ("out_features", "out_indices"):
        new_config = copy.deepcopy(config)
        setattr(new_config, name, None)
        model = HieraBackbone(new_config)
        assert len(model.channels) == 1 and model.channels == [num_features[-1]]


def test_backbone_create_from_modified_config():
    config, inputs = prepare_config_and_inputs_for_common()
    model = HieraBackbone(config)
    result = model(**inputs)
    assert len(result.feature_maps) == len(config.out_features) == len(model.channels)
    assert len(result.feature_maps) == len(config.out_indices)
    for name in ("out_features", "out_indices"):
        modified = copy.deepcopy(config)
        setattr(modified, name, None)
        model = HieraBackbone(modified)
        result = model(**inputs)
        assert len(result.feature_maps) == 1 and len(model.channels) == 1
    modified = copy.deepcopy(config)
    modified.use_pretrained_backbone = False
    result = HieraBackbone(modified)(**inputs)
    assert len(result.feature_maps) == 1


def test_backbone_common_attributes():
    config, _ = prepare_config_and_inputs_for_common()
    backbone = HieraBackbone(config)
    for name in ("backbone_type", "stage_names", "num_features", "out_indices", "out_features",
                 "out_feature_channels", "channels"):  # fmt: skip
        assert hasattr(backbone, name), name
    assert backbone.backbone_type == BackboneType.TRANSFORMERS.value
    assert backbone.num_features is not None
    assert len(backbone.channels) == len(backbone.out_indices)
    assert len(backbone.stage_names) == len(backbone.num_features)
    assert len(backbone.channels) <= len(backbone.num_features)
    assert len(backbone.out_feature_channels) == len(backbone.stage_names)


def test_backbone_outputs():
    config, inputs = prepare_config_and_inputs_for_common()
    backbone = HieraBackbone(config)
    outputs = backbone(**inputs)
    assert isinstance(outputs.feature_maps, tuple)
    assert len(outputs.feature_maps) == len(backbone.channels)
    for feature_map, channels in zip(outputs.feature_maps, backbone.channels):
        assert feature_map.shape[:2] == (BATCH, channels)
    assert outputs.hidden_states is None and outputs.attentions is None
    outputs = backbone(**inputs, output_hidden_states=True)
    assert outputs.hidden_states is not None
    assert len(outputs.hidden_states) == len(backbone.stage_names)
    outputs = backbone(**inputs, output_attentions=True)
    assert outputs.attentions is not None


def test_a_built_model_keeps_its_config():
    """Changing a config after building a model from it changes neither that model nor its
    `model.config` (which refuses assignments); the next model built sees the change."""
    config, inputs = prepare_config_and_inputs_for_common()
    config.num_labels = LABELS
    model = HieraForImageClassification(config)
    config.num_labels = 3
    assert model.config.num_labels == LABELS
    assert model(**inputs).logits.shape == (BATCH, LABELS)
    with pytest.raises(AttributeError, match="belongs to a built model"):
        model.config.num_labels = 4
    assert HieraForImageClassification(config)(**inputs).logits.shape == (BATCH, 3)
    # The Flax modules seal theirs too.
    from hiera_jax.models.hiera import HieraForImageClassification as Module

    module = Module(config)
    config.num_labels = 5
    assert module.config.num_labels == 3 and module.config.is_frozen and not config.is_frozen


# ---------------------------------------------------------------------- more of ModelTesterMixin
def _config_zero_init(config):
    """ModelTesterMixin's `_config_zero_init`: every init range and std set to 1e-10."""
    config = copy.deepcopy(config)
    config.initializer_range = 1e-10
    return config


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_initialization(model_class):
    """Every parameter starts at mean 0 or 1 once the init ranges are ~0 (no stray init)."""
    model = model_class(_config_zero_init(prepare_config_and_inputs_for_common()[0]))
    for path, param in jax.tree_util.tree_leaves_with_path(model.params):
        name, param = jax.tree_util.keystr(path), np.asarray(param)
        if model_class is HieraForPreTraining and name.endswith("['kernel']") and param.ndim == 2:
            # The official MAE's init (xavier-uniform dense kernels), where transformers draws
            # them from initializer_range: README says so. Within xavier's bound, not ~0.
            bound = math.sqrt(6 / sum(param.shape))
            assert 0 < np.abs(param).max() <= bound, name
            continue
        module = model.params  # the dict holding this parameter
        for key in path[:-1]:
            module = module[key.key]
        if model_class is HieraForPreTraining and np.ndim(module.get("kernel")) >= 3:
            # Convolutions, which the official MAE init draws as a dense layer (the patch
            # embedding, xavier) or leaves to PyTorch's default (fusion heads, 1 / sqrt(fan_in)).
            shape = np.shape(module["kernel"])
            fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
            bound = max(1 / math.sqrt(fan_in), math.sqrt(6 / (fan_in + fan_out)))
            assert np.abs(param).max() <= bound + 1e-7, name
            continue
        mean = round(float(np.mean(param)) * 1e9) / 1e9
        assert mean in (0.0, 1.0), (name, mean)


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_model_is_small(model_class):
    """The tester's models stay under transformers' 1M-parameter bound for common tests."""
    model = model_class(prepare_config_and_inputs_for_common()[0])
    assert model.num_parameters() < 1_000_000


def test_can_use_safetensors(tmp_path):
    config, _ = prepare_config_and_inputs_for_common()
    model = HieraForImageClassification(config)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(os.path.join(tmp_path, "model.safetensors"))
    reloaded = HieraForImageClassification.from_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reloaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_shapes_have_properly_initialized_weights(tmp_path):
    """A head re-made at another size is initialised as the config says (here: ~0)."""
    config = _config_zero_init(prepare_config_and_inputs_for_common()[0])
    HieraForImageClassification(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="shapes did not match"):
        new = HieraForImageClassification.from_pretrained(
            tmp_path, num_labels=42, ignore_mismatched_sizes=True
        )
    kernel, bias = (np.asarray(new.params["head"][k]) for k in ("kernel", "bias"))
    assert kernel.shape[-1] == 42 and np.abs(kernel).max() < 1e-6 and np.abs(bias).max() < 1e-6


def test_correct_missing_keys(tmp_path):
    """The base model's weights load into the classifier; the head is reported missing."""
    config, inputs = prepare_config_and_inputs_for_common()
    base = HieraModel(config)
    base.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="head"):
        model = HieraForImageClassification.from_pretrained(tmp_path)
    got = model(**inputs, output_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(got, base(**inputs, output_hidden_states=True).hidden_states[-1],
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda c: c.__name__)
def test_shared_forwards_keep_no_model_alive(model_class):
    """Models of one config share their compiled forward; it holds the module, not the model
    (whose params would then never be freed)."""
    import gc
    import weakref

    config, inputs = prepare_config_and_inputs_for_common()
    model = model_class(config)
    kw = {"mask_rng": jax.random.key(0)} if model_class is HieraForPreTraining else {}
    model(**inputs, **kw)
    params = weakref.ref(jax.tree.leaves(model.params)[0])
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and params() is None
