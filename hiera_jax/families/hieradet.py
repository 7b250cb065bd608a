"""SAM 2's HieraDet family record: the trunk (`sam2_hiera_*`), timm's classifier on it, and SAM 2's
image encoder (trunk + FPN neck).

What differs from Hiera, said once here: `create` gives the trunk (or timm's classifier with
`num_classes`), a Flax module rather than a transformers-style class; checkpoints are SAM 2's,
timm's or transformers' Sam2 (`load_hieradet`), whose variant comes from the tensors, so only
`input_size` and execution fields can be overridden; train.py finetunes it as a classifier (MAE
pretraining is abs-win Hiera's, which `init_from` takes); its blocks differ in shape and are never
scanned.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
from PIL import Image

from hiera_jax import families
from hiera_jax.families import Family, Loaded
from hiera_jax.models import hieradet, hieradet_neck
from hiera_jax.models.hieradet import HieraDetConfig
from hiera_jax.models.hieradet_neck import FpnNeckConfig
from hiera_jax.weights.directory import read_json
from hiera_jax.weights.hieradet_loading import is_hieradet_source, load_hieradet, save_hieradet

# timm's default evaluation crop (224 of a 256 short side) for a classifier without its own.
DEFAULT_CROP_PCT = 224 / 256


class Features(nn.Module):
    """SAM 2's trunk maps and `ImageEncoder`'s outputs (params `trunk`, `neck`), from one trunk
    pass."""

    trunk: HieraDetConfig
    neck: FpnNeckConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        _, maps = hieradet.HieraDet(self.trunk, name="trunk")(x, return_intermediates=True)
        out = {f"stage{i + 1}": m for i, m in enumerate(maps)}
        if self.neck.scalp >= len(maps):
            raise ValueError(f"scalp={self.neck.scalp} drops all {len(maps)} levels")
        neck = hieradet_neck.FpnNeck(self.neck, jnp.dtype(self.trunk.dtype), name="neck")
        fpn, pos = neck(maps)
        if self.neck.scalp > 0:
            fpn, pos = fpn[: -self.neck.scalp], pos[: -self.neck.scalp]
        out["vision_features"] = fpn[-1]
        out.update({f"backbone_fpn{i}": f for i, f in enumerate(fpn)})
        out.update({f"vision_pos_enc{i}": e for i, e in enumerate(pos)})
        return out


def _trunk_params(params: Any) -> Any:
    """A classifier's params without its head (the trunk's tree, as HieraDet takes)."""
    return {k: v for k, v in params.items() if k != "head"} if "head" in params else params


def _variants() -> list[str]:
    return list(hieradet.VARIANTS)


def _create(name: str, **overrides: Any) -> nn.Module:
    """The trunk, as SAM 2 uses it; with `num_classes=N` timm's classifier."""
    if not overrides.get("num_classes"):  # None or 0
        overrides.pop("num_classes", None)
        return hieradet.HieraDet(hieradet.get_config(name, **overrides))
    return hieradet.HieraDetForImageClassification(hieradet.get_config(name, **overrides))


def _load(name_or_path: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`load_hieradet`, refusing the Hiera loader's options that have no meaning here."""
    args = {k: v for k, v in kwargs.items() if v is not None}
    for name in ("in_chans", "source", "model_type"):
        if name in args:
            raise ValueError(
                f"{name}= is for Hiera checkpoints; {name_or_path} is SAM 2's HieraDet"
            )
    args.pop("seed", None)
    return load_hieradet(name_or_path, **args)


def _load_for_inference(
    name_or_path: Any,
    *,
    encoder: bool | None = None,
    input_size: int | tuple[int, int] | None = None,
    **overrides: Any,
) -> Loaded:
    """A classifier where the checkpoint has timm's head (a HieraDet finetune's
    `workdir/model`), else the trunk and, where the checkpoint has SAM 2's neck (`encoder` None
    or True), the FPN. Images are preprocessed as SAM 2 does (`SAM2Transforms`: resized to the
    square input, bilinear), a classifier's as it was evaluated (short side to size / crop_pct,
    centre crop); normalised with the checkpoint's timm `pretrained_cfg` mean/std, else
    ImageNet's (SAM 2's own)."""
    module, params = load_hieradet(
        name_or_path,
        encoder=encoder,
        input_size=input_size,
        classifier=None if encoder is None else False,
        revision=overrides.pop("revision", None),
        token=overrides.pop("token", None),
        **{k: v for k, v in overrides.items() if k != "source"},
    )
    pretrained: dict[str, Any] = {}
    meta_path = os.path.join(os.fspath(name_or_path), "config.json")
    if os.path.isfile(meta_path):
        pretrained = (read_json(meta_path) or {}).get("pretrained_cfg") or {}
    mean = tuple(pretrained["mean"]) if pretrained.get("mean") else None  # None: ImageNet's
    std = tuple(pretrained["std"]) if pretrained.get("std") else None
    if isinstance(module, hieradet_neck.ImageEncoder):
        config, neck, model_type = module.trunk, module.neck, "encoder"
    else:
        config, neck = module.config, None
        classifier = isinstance(module, hieradet.HieraDetForImageClassification)
        model_type = "classification" if classifier else "backbone"
    size = tuple(config.input_size)
    if model_type == "classification":  # as it was evaluated: short side, centre crop
        crop_pct = float(pretrained.get("crop_pct") or DEFAULT_CROP_PCT)
        transform = dict(short_side=int(min(size) / crop_pct), crop=size)
    else:  # SAM2Transforms: the whole image resized to the square input, bilinear
        transform = dict(resize_to=size, resample=Image.BILINEAR, crop=None)
    return Loaded(
        config,
        params,
        model_type,
        source=os.fspath(name_or_path),
        mean=mean,
        std=std,
        transform=transform,
        neck=neck,
    )


def _random_for_inference(name: str, seed: int = 0, **overrides: Any) -> Loaded:
    """SAM 2's image encoder (trunk + FPN neck), randomly initialised."""
    trunk = hieradet.get_config(name, **overrides)
    encoder = hieradet_neck.ImageEncoder(trunk, FpnNeckConfig())
    x = jnp.zeros((1, *trunk.input_size, trunk.in_chans), jnp.float32)
    params = jax.jit(encoder.init)(jax.random.key(seed), x)["params"]
    return Loaded(trunk, params, "encoder", source=f"random {name}", neck=FpnNeckConfig())


def _features(config: HieraDetConfig, neck: FpnNeckConfig | None = None):
    """`(params, x) -> {stageN: map}`, and with a neck SAM 2's `ImageEncoder` outputs too."""
    if neck is not None:
        features = Features(config, neck)
        return lambda p, x: features.apply({"params": p}, x)
    trunk = hieradet.HieraDet(config)

    def stage_maps(p, x):
        _, maps = trunk.apply({"params": _trunk_params(p)}, x, return_intermediates=True)
        return {f"stage{i + 1}": m for i, m in enumerate(maps)}

    return stage_maps


def _training_config(name: str | None, kwargs: dict[str, Any]) -> HieraDetConfig:
    if kwargs.pop("scan_blocks", False):
        raise ValueError(
            f"--config.model.scan_blocks=True: SAM 2's HieraDet ({name}) runs its blocks "
            "unscanned (their windows and widths differ from block to block)"
        )
    known = {f.name for f in dataclasses.fields(HieraDetConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"--config.model.{unknown[0]} is not an option of SAM 2's HieraDet ({name}); "
            f"its options: {', '.join(sorted(known))}"
        )
    return hieradet.get_config(name, **kwargs)


def _training_model(config: HieraDetConfig, task: str) -> nn.Module:
    if task != "classification":
        raise ValueError(
            "SAM 2's HieraDet trains as a classifier only (task=classification): pretrain the "
            "abs-win Hiera it starts from with MAE (configs/in1k_mae_abswin.py, "
            "configs/digits_mae_abswin.py) and pass that run as init_from"
        )
    return hieradet.HieraDetForImageClassification(config)


def _encoder_params(text: str) -> tuple[dict, str]:
    """A HieraDet trunk for `init_from`, from whichever family `text` is (`families.dispatch`):
    SAM 2's own (`load_hieradet`: a HieraDet finetune's workdir, a SAM 2 / timm / transformers
    checkpoint or name), or an abs-win Hiera's encoder (an MAE run of configs/*_mae_abswin.py,
    or any Hiera directory or name: its `pos_embed_win` is HieraDet's `pos_embed_window`, every
    other tensor has the same path)."""

    def trunk_of(family: Family, path: Any) -> tuple[dict, str]:
        if family is FAMILY:
            _, trunk = load_hieradet(path, encoder=False)
            return flax.traverse_util.flatten_dict(trunk, sep="/"), os.fspath(path)
        flat, where = family.encoder_params(path)
        renamed = {("pos_embed_window" if k == "pos_embed_win" else k): v for k, v in flat.items()}
        return renamed, where

    return families.dispatch(text, trunk_of)


def _export(
    directory: str, params: Any, config: HieraDetConfig, *, name: str, mean, std, crop_pct,
    **_: Any,
) -> str:  # fmt: skip
    """timm's hub directory (`load_hieradet` and timm read it)."""
    return save_hieradet(
        directory,
        params,
        config,
        architecture=name,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=float(crop_pct),
    )


FAMILY = Family(
    name="hieradet",
    title="SAM 2's HieraDet",
    config_type=HieraDetConfig,
    variants=_variants,
    get_config=hieradet.get_config,
    is_source=is_hieradet_source,
    create=_create,
    load=_load,
    load_for_inference=_load_for_inference,
    random_for_inference=_random_for_inference,
    features=_features,
    classifier=hieradet.HieraDetForImageClassification,
    training_config=_training_config,
    training_model=_training_model,
    encoder_params=_encoder_params,
    export=_export,
    scannable=False,
)
