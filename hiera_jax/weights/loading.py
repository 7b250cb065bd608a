"""Loading by name: resolve a name, repo, URL or path with the hub, then read the directory.

`load_model` is the one loading path: the Hugging Face-style classes' `from_pretrained`,
`hiera_jax.load_pretrained`, the Predictor and train.py's `init_from` all end here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax

from hiera_jax.models.config import HieraConfig
from hiera_jax.weights import directory as directory_lib
from hiera_jax.weights import hub


def load_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    source: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> directory_lib.Checkpoint:
    """The checkpoint (config, class, NumPy params, preprocessing) behind any name or path
    `hiera_jax.weights.hub.resolve_pretrained` takes, downloaded and converted once if needed."""
    folder = hub.resolve_pretrained(name_or_path, source=source, revision=revision, token=token)
    return directory_lib.read_checkpoint(folder)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    model_type: str | None = None,
    config: HieraConfig | None = None,
    in_chans: int | None = None,
    ignore_mismatched_sizes: bool = False,
    seed: int = 0,
    source: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **overrides: Any,
) -> tuple[HieraConfig, str, dict, directory_lib.Checkpoint]:
    """(config, model_type, params, checkpoint) for a name or path, as the class asked for.

    `model_type` (default: the checkpoint's) picks the class: a classifier's weights asked for as
    `backbone` drop the head; what the checkpoint lacks (a head for an MAE, a pooler norm) is
    initialised from `seed`, with a warning that lists it, as transformers does. `config`
    replaces the checkpoint's and `overrides` change fields of it (either vocabulary); tensors
    that then do not fit are an error unless `ignore_mismatched_sizes`. `input_size` (or
    `image_size`) resamples the position tables, `in_chans` adapts the patch embedding.
    """
    checkpoint = load_checkpoint(name_or_path, source=source, revision=revision, token=token)
    model_type = model_type or checkpoint.model_type
    input_size = overrides.pop("input_size", overrides.pop("image_size", None))
    target = config or checkpoint.config
    if overrides:
        target = target.replace(**overrides)
    params, missing, resized = directory_lib.params_for(
        checkpoint,
        model_type,
        target,
        key=jax.random.key(seed),
        ignore_mismatched_sizes=ignore_mismatched_sizes,
    )
    if missing or resized:
        warnings.warn(_initialised_report(model_type, name_or_path, missing, resized), stacklevel=3)
    moved = directory_lib.Checkpoint(target, model_type, params, checkpoint.preprocessing)
    extra = {} if input_size is None else {"input_size": input_size}
    target, params = directory_lib.adapt_checkpoint(moved, in_chans=in_chans, **extra)
    return target, model_type, params, checkpoint


def _initialised_report(model_type: str, name_or_path: Any, missing, resized) -> str:
    """What transformers' loading report says: the tensors the checkpoint lacks, and those it
    holds at another shape (with both shapes), all newly initialised."""
    cls = directory_lib.ARCHITECTURES[model_type]
    parts = []
    if resized:
        shown = "; ".join(f"{p}: checkpoint {a} vs model {b}" for p, a, b in resized[:12])
        more = " ..." if len(resized) > 12 else ""
        parts.append(
            f"some weights of {cls} were not initialised from the checkpoint "
            f"{os.fspath(name_or_path)} because the shapes did not match, and are newly "
            f"initialised: {shown}{more}"
        )
    if missing:
        shown = ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else "")
        parts.append(
            f"some weights of {cls} were not in the checkpoint {os.fspath(name_or_path)} and "
            f"are newly initialised: {shown}"
        )
    return "; ".join(parts) + "; train the model before using it"


def load_pretrained(
    name_or_dir: str | os.PathLike,
    *,
    in_chans: int | None = None,
    source: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    **kwargs: Any,
):
    """`(flax module, params)` for a pretrained name, a Hugging Face repo, a URL or a directory.

    `name_or_dir` is a directory written by `save_pretrained`, the converter or train.py, or
    anything `hiera_jax.weights.hub.resolve_pretrained` takes: one of our names (`hiera_tiny_224`,
    `mae_hiera_base_224`, `hiera_base_16x224`, ..., `hiera_jax.list_pretrained()`), a Hugging
    Face repo id (`facebook/hiera-tiny-224-in1k-hf`, `hf-hub:timm/hiera_base_224.mae`), a timm
    name with its tag (`hiera_base_224.mae_in1k_ft_in1k`), an official `.pth` URL, or a PyTorch
    checkpoint file. Those are downloaded (honouring `HF_HOME`, `HF_HUB_OFFLINE`; `revision`
    and `token` go to the hub; `source` picks "hf", "timm" or "official" for our names) and
    converted once into `hiera_jax.weights.hub.cache_dir()`. The other keyword arguments are
    those of `load_model`.

    Hiera's checkpoints only: SAM 2's HieraDet tensors raise `formats.OtherFamily`, which
    `hiera_jax.families.load_pretrained` (and `hiera_jax.load_pretrained`) catch to hand them to
    HieraDet's loader.
    """
    from hiera_jax.models.factory import build_model

    config, model_type, params, _ = load_model(
        name_or_dir, in_chans=in_chans, source=source, revision=revision, token=token, **kwargs
    )
    return build_model(config, model_type), params


def pretrained_config(name_or_path: str | os.PathLike, **hub_args: Any) -> HieraConfig:
    """`HieraConfig.from_pretrained`: the config of any name or path the hub resolves."""
    folder = hub.resolve_pretrained(name_or_path, **hub_args)
    return directory_lib.read_hiera_config(folder)
