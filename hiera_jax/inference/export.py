"""A model as one serialized `jax.export` artifact: runs where only jax is installed.

`export_model` writes the jitted forward of a model with its weights closed over, lowered for
several platforms at once (CPU, CUDA and TPU lower here without those devices) with a symbolic
batch dimension, plus a small JSON beside it: the input layout and size, the normalisation the
model expects, the class names, the output names, and the jax version that wrote it. A server
needs nothing but jax to run it:

    import json, jax, numpy as np
    exported = jax.export.deserialize(bytearray(open("hiera.jaxexport", "rb").read()))
    meta = json.load(open("hiera.jaxexport.json"))
    x = (images_uint8 / 255 - np.array(meta["mean"])) / np.array(meta["std"])   # [B, H, W, C]
    probs = exported.call(x.astype(np.float32))

The artifact takes the model's normalised channels-last input ([B, H, W, C] float32, or
[B, T, H, W, C] for video): resizing and cropping stay with the caller (`Predictor.preprocess`
does both; `Predictor.from_exported` runs an artifact with the same preprocessing as the live
model). The kernels are XLA's plain ops (`attention_kernel="xla"`, `mlp_kernel="xla"`): the
Pallas kernels are compiled for one chip generation, the artifact for any.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hiera_jax import families
from hiera_jax.inference.artifact import FORMAT, load_exported, meta_path
from hiera_jax.inference.predictor import Predictor

__all__ = ["PLATFORMS", "TASKS", "export_model", "load_exported", "meta_path", "portable_config"]

PLATFORMS = ("cpu", "cuda", "tpu")
TASKS = ("classify", "features")


def export_model(
    model_or_name: Any,
    params: Any = None,
    *,
    path: str | os.PathLike,
    batch: str | int = "b",
    platforms: Sequence[str] = PLATFORMS,
    dtype: str | None = None,
    task: str | None = None,
) -> str:
    """Write `model_or_name`'s forward as a `jax.export` artifact at `path` (and `path.json`).

    `model_or_name`: a `Predictor`, a Hugging Face-style model (`HieraForImageClassification`,
    `HieraModel`, ...: its config and params), or any name or directory `Predictor.from_pretrained`
    loads (SAM 2's included). `params` replaces the model's parameters. `batch`: the name of a
    symbolic batch dimension ("b"), or a fixed batch size. `task`: "classify" (class
    probabilities, for classifiers, the default there) or "features" (the per-stage maps
    `stage1`..., and SAM 2's encoder outputs where the model has its neck). `dtype`: the compute
    dtype (the model's by default). Returns `path`.
    """

    predictor = _predictor(model_or_name)
    task = task or ("classify" if predictor.has_head else "features")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "classify" and not predictor.has_head:
        raise ValueError(
            f"{predictor.source} has no classifier head: export it with task='features'"
        )
    platforms = tuple(platforms)
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if not platforms or unknown:
        raise ValueError(f"platforms must be some of {PLATFORMS}, got {platforms!r}")
    if isinstance(batch, bool) or not (isinstance(batch, str) or (isinstance(batch, int))):
        raise ValueError(f"batch must be a dimension name or a positive size, got {batch!r}")
    if isinstance(batch, int) and batch < 1:
        raise ValueError(f"batch must be a positive size, got {batch}")

    config = portable_config(predictor.config, dtype)
    family = families.of_config(config)
    params = predictor.params if params is None else params
    if task == "classify":
        classifier = family.classifier(config)

        def forward(x):
            logits = classifier.apply({"params": params}, x)
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        outputs = ["probs"]
    else:
        maps = family.features(config, predictor.neck)

        def forward(x):
            out = maps(params, x)
            if isinstance(out, dict):
                return {k: v.astype(jnp.float32) for k, v in out.items()}
            return {f"stage{i + 1}": m.astype(jnp.float32) for i, m in enumerate(out)}

        outputs = None  # the dict's keys, read after tracing
    input_shape = (*config.input_size, config.in_chans)
    (dim,) = jax.export.symbolic_shape(batch) if isinstance(batch, str) else (batch,)
    spec = jax.ShapeDtypeStruct((dim, *input_shape), jnp.float32)
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(spec)
    if outputs is None:
        outputs = sorted(jax.tree.unflatten(exported.out_tree, exported.out_avals))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    meta = {
        "format": FORMAT,
        "source": predictor.source,
        "family": family.name,
        "model_type": predictor.model_type,
        "task": task,
        "input": "normalised pixels, channels-last, float32: (x / 255 - mean) / std",
        "input_layout": "BTHWC" if len(config.input_size) == 3 else "BHWC",
        "input_shape": [batch if isinstance(batch, str) else int(batch), *input_shape],
        "mean": list(predictor.mean),
        "std": list(predictor.std),
        "transform": _jsonable(predictor.transform),
        "temporal_stride": predictor.temporal_stride,
        "labels": list(predictor.names) if task == "classify" else None,
        "outputs": outputs,
        "platforms": list(platforms),
        "dtype": config.dtype,
        "jax_version": jax.__version__,
    }
    with open(meta_path(path), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return path


def portable_config(config: Any, dtype: str | None = None) -> Any:
    """The config with XLA's plain ops for attention and MLP (the artifact runs on any chip),
    and `dtype` as its compute dtype if given."""
    changes = {k: "xla" for k in ("attention_kernel", "mlp_kernel") if hasattr(config, k)}
    if dtype is not None:
        changes["dtype"] = dtype
    return config.replace(**changes) if changes else config


def _predictor(model_or_name: Any) -> Predictor:
    """The Predictor of what `export_model` was given (its config, params, preprocessing)."""
    if isinstance(model_or_name, Predictor):
        return model_or_name
    if hasattr(model_or_name, "module") and hasattr(model_or_name, "config"):
        model = model_or_name  # the Hugging Face-style classes
        if model.model_type not in ("classification", "backbone"):
            raise ValueError(
                f"export_model takes a classifier or a HieraModel, not {type(model).__name__} "
                "(its outputs are not a serving model's)"
            )
        return Predictor(
            model.config, model.params, model_type=model.model_type, source=type(model).__name__
        )
    if isinstance(model_or_name, (str, os.PathLike)):
        return Predictor.from_pretrained(os.fspath(model_or_name))
    raise TypeError(
        "export_model takes a Predictor, a hiera_jax model (HieraForImageClassification, "
        f"HieraModel, ...) or a name or directory, got {type(model_or_name).__name__}"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
