"""Loading by name: resolve a name, repo, URL or path with the hub, then read the directory."""

from __future__ import annotations

import os
from typing import Any

from hiera_jax.weights import hub
from hiera_jax.weights.directory import load_directory


def load_pretrained(
    name_or_dir: str | os.PathLike,
    *,
    in_chans: int | None = None,
    source: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **overrides: Any,
):
    """`(model, params)` for a pretrained name, a Hugging Face repo, a URL or a local directory.

    `name_or_dir` is a directory written by `save_pretrained`, the converter or train.py, or
    anything `hiera_jax.weights.hub.resolve_pretrained` takes: one of our names (`hiera_tiny_224`,
    `mae_hiera_base_224`, `hiera_base_16x224`, ..., `hiera_jax.list_pretrained()`), a Hugging
    Face repo id (`facebook/hiera-tiny-224-in1k-hf`, `hf-hub:timm/hiera_base_224.mae`), a timm
    name with its tag (`hiera_base_224.mae_in1k_ft_in1k`), an official `.pth` URL, or a PyTorch
    checkpoint file. Those are downloaded (honouring `HF_HOME`, `HF_HUB_OFFLINE`; `revision`
    and `token` go to the hub; `source` picks "hf", "timm" or "official" for our names) and
    converted once into `hiera_jax.weights.hub.cache_dir()`. `in_chans` and `overrides` are
    those of `hiera_jax.weights.directory.load_directory`.
    """
    directory = hub.resolve_pretrained(name_or_dir, source=source, revision=revision, token=token)
    return load_directory(directory, in_chans=in_chans, **overrides)
