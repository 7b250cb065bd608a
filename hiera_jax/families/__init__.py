"""Model families: one record per family (Hiera, SAM 2's HieraDet) that training, inference and
the top-level API look up instead of branching on the family.

A family's record says what differs between families: its config type and variant names, how to
build a module for a task, how to recognise its names and checkpoints, how to load and export its
weights, and which params `init_from` fills. Adding a family is adding a record (a module here
with `FAMILY`) and its files under models/ and weights/; training, inference and weights do not
change. Floor: above `models` and `weights`, below `inference` and `training`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hiera_jax.weights.formats import OtherFamily


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What a family's loader gives inference: the module's config, its params and type, and how
    its images are preprocessed (None = the Predictor's defaults)."""

    config: Any
    params: Any
    model_type: str  # classification, pretraining, backbone, feature_backbone, encoder
    source: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    preprocessing: Mapping[str, Any] | None = None  # an image processor's settings
    transform: Mapping[str, Any] | None = None  # `transform_image` keywords but mean and std
    neck: Any = None  # SAM 2's FPN neck config, for its ImageEncoder outputs


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: the facts and functions the floors above look up (module docstring)."""

    name: str  # the registry key; `OtherFamily.family` names it
    title: str  # for messages: "Hiera", "SAM 2's HieraDet"
    config_type: type
    variants: Callable[[], Sequence[str]]  # names `create_model` and train.py's model.name take
    get_config: Callable[..., Any]  # (name, **overrides) -> config
    is_source: Callable[[Any], bool]  # whether a name, repo or directory is surely this family's
    create: Callable[..., Any]  # create_model(name, **overrides) -> Flax module
    load: Callable[..., tuple[Any, Any]]  # load_pretrained(name_or_path, **kw) -> (module, params)
    load_for_inference: Callable[..., Loaded]  # Predictor.from_pretrained's loader
    random_for_inference: Callable[..., Loaded]  # Predictor.random's (name, seed, **overrides)
    features: Callable[[Any, Any], Callable]  # (config, neck) -> (params, x) -> per-stage maps
    classifier: Callable[[Any], Any]  # config -> the classifier module (Predictor's probabilities)
    training_config: Callable[[str | None, dict], Any]  # train.py's model fields -> config
    training_model: Callable[[Any, str], Any]  # (config, task) -> the module train.py trains
    encoder_params: Callable[[str], tuple[dict, str]]  # init_from -> ({flat path: array}, where)
    export: Callable[..., str]  # train.py's workdir/model: (dir, params, config, run) -> dir
    scannable: bool  # whether blocks can run as one scanned layer (scan_blocks)
    # Whether `hiera_jax.hf`'s transformers-style classes serve it (`create_model`,
    # `hiera_jax.load_pretrained`); a family without them gets its Flax modules there.
    transformers_classes: bool = False


def _families() -> tuple[Family, ...]:
    from hiera_jax.families import hiera, hieradet

    return (hiera.FAMILY, hieradet.FAMILY)


DEFAULT = "hiera"


def get(name: str) -> Family:
    """The family registered as `name` ("hiera", "hieradet")."""
    for family in _families():
        if family.name == name:
            return family
    raise ValueError(f"no model family {name!r}; families: {', '.join(names())}")


def names() -> list[str]:
    return [f.name for f in _families()]


def all_variants() -> list[str]:
    """Every family's variant names (`create_model`, `predict --model`, train.py's model.name)."""
    return [v for f in _families() for v in f.variants()]


def for_name(name: str | None) -> Family:
    """The family of a variant name (None and unknown names: Hiera's, whose errors list names)."""
    for family in _families():
        if name is not None and name in family.variants():
            return family
    return get(DEFAULT)


def of_config(config: Any) -> Family:
    """The family whose config type `config` is."""
    for family in _families():
        if isinstance(config, family.config_type):
            return family
    raise TypeError(f"not a model config of any family: {type(config).__name__}")


def for_source(name_or_path: Any) -> Family:
    """The family of a name, repo or directory, as far as it tells without reading tensors; Hiera's
    otherwise (its loader hands over with `OtherFamily` when the tensors say another)."""
    for family in _families():
        if family.name != DEFAULT and family.is_source(name_or_path):
            return family
    return get(DEFAULT)


def model_path(name_or_path: Any) -> Any:
    """A finished train.py workdir stands for the `model/` it wrote; anything else as given."""
    if isinstance(name_or_path, (str, os.PathLike)):
        text = os.fspath(name_or_path)
        inner = os.path.join(text, "model")
        if (
            os.path.isdir(text)
            and not os.path.isfile(os.path.join(text, "config.json"))
            and os.path.isfile(os.path.join(inner, "config.json"))
        ):
            return inner
    return name_or_path


def dispatch(name_or_path: Any, call: Callable[[Family, Any], Any]) -> Any:
    """`call(family, path)` for the family of `name_or_path` (a workdir: its `model/`), found by
    `for_source`, or, when that family's loader finds another family's tensors
    (`OtherFamily`), the family it names."""
    path = model_path(name_or_path)
    family = for_source(path)
    try:
        return call(family, path)
    except OtherFamily as e:
        if e.family is None or e.family == family.name:
            raise
        return call(get(e.family), path)


def load_pretrained(name_or_path: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`(Flax module, params)` for any family's pretrained name, repo, URL, file or directory:
    the family's `load` (Hiera: `weights.loading.load_model`'s keywords; HieraDet:
    `load_hieradet`'s, `input_size=`, `dtype=`, `encoder=`, `classifier=`)."""
    return dispatch(name_or_path, lambda family, path: family.load(path, **kwargs))


__all__ = [
    "DEFAULT",
    "Family",
    "Loaded",
    "OtherFamily",
    "all_variants",
    "dispatch",
    "for_name",
    "for_source",
    "get",
    "load_pretrained",
    "model_path",
    "names",
    "of_config",
]
