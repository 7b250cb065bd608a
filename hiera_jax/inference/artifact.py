"""Reading a `jax.export` artifact that `hiera_jax.export_model` wrote: jax and json only.

Kept apart from `export.py` (which builds artifacts from models) so that running one needs no
model code: `Predictor.from_exported` and a server use this module alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "hiera-jax-export/1"


def meta_path(path: str | os.PathLike) -> str:
    """Where the JSON beside an artifact lives: `<path>.json`."""
    return os.fspath(path) + ".json"


def load_exported(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """`(call, meta)` of an artifact: `call(x)` runs it on a normalised batch; a batch of
    another shape, rank or dtype than the artifact takes is one ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path}")
    if not os.path.isfile(meta_path(path)):
        raise FileNotFoundError(f"{path} has no {os.path.basename(meta_path(path))} beside it")
    with open(meta_path(path)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path(path)} is not a hiera-jax export ({FORMAT})")
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    expected = meta["input_shape"]

    def call(x: Any) -> Any:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        fixed = [d for d in expected if not isinstance(d, str)]
        shape_ok = x.ndim == len(expected) and all(
            isinstance(want, str) or got == want for got, want in zip(x.shape, expected)
        )
        if not shape_ok or x.shape[0] == 0:
            raise ValueError(
                f"{path} takes a batch of shape {expected} (normalised channels-last "
                f"pixels; {fixed[-3:] if fixed else expected} per image), got {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{path} takes normalised float32 pixels, got dtype {x.dtype}: "
                "(x / 255 - mean) / std first"
            )
        return exported.call(jnp.asarray(x, jnp.float32))

    return call, meta
