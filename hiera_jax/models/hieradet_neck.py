"""SAM 2's image encoder around the HieraDet trunk: the FPN neck and its sine position encoding.

SAM 2 (`sam2.modeling.backbones.image_encoder`) feeds the trunk's per-stage maps to `FpnNeck`:
a 1x1 lateral conv per stage to `d_model` channels, top-down fusion (the coarser output
upsampled 2x, nearest in every SAM 2 config, and added) on `fpn_top_down_levels` only, and a
fixed `PositionEmbeddingSine` per level. `ImageEncoder` then drops the `scalp` coarsest levels
and returns `vision_features` (the coarsest kept level), `vision_pos_enc` and `backbone_fpn`.
Maps are NHWC here (SAM 2's are NCHW); submodules are named as SAM 2's keys (`trunk`,
`neck/convs_0`), so `hiera_jax.weights.hieradet_convert` maps an `image_encoder.*` state dict
onto them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiera_jax.models.hieradet import HieraDet, HieraDetConfig
from hiera_jax.models.layers import fusion_head_init
from hiera_jax.models.pos_embed import interpolation_matrix

INTERP_MODES = ("nearest", "bilinear")
FUSE_TYPES = ("sum", "avg")


@dataclasses.dataclass(frozen=True)
class FpnNeckConfig:
    """SAM 2's `FpnNeck` + `PositionEmbeddingSine` + `ImageEncoder.scalp` arguments.

    The defaults are those of every SAM 2 and SAM 2.1 config (`sam2.1_hiera_*.yaml`); the
    `FpnNeck` class itself defaults to bilinear fusion on all levels.
    """

    d_model: int = 256
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    fpn_interp_model: str = "nearest"  # or "bilinear" (align_corners=False)
    fuse_type: str = "sum"  # or "avg": (lateral + top-down) / 2
    fpn_top_down_levels: tuple[int, ...] | None = (2, 3)  # None = every level
    scalp: int = 1  # coarsest levels dropped from the encoder's outputs
    num_pos_feats: int = 256  # channels of the sine encoding (half for y, half for x)
    temperature: float = 10000.0
    normalize: bool = True
    scale: float | None = None  # None = 2·pi (with normalize)

    def __post_init__(self) -> None:
        if isinstance(self.fpn_top_down_levels, list):
            object.__setattr__(self, "fpn_top_down_levels", tuple(self.fpn_top_down_levels))
        for name in ("d_model", "kernel_size", "stride", "num_pos_feats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("padding", "scalp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {self.num_pos_feats}")
        if self.fpn_interp_model not in INTERP_MODES:
            raise ValueError(
                f"fpn_interp_model must be one of {INTERP_MODES}, got {self.fpn_interp_model!r}"
            )
        if self.fuse_type not in FUSE_TYPES:
            raise ValueError(f"fuse_type must be one of {FUSE_TYPES}, got {self.fuse_type!r}")
        if self.scale is not None and not self.normalize:
            raise ValueError("scale is only used with normalize=True (as in SAM 2)")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def sine_position_encoding(grid: Sequence[int], config: FpnNeckConfig) -> np.ndarray:
    """SAM 2's `PositionEmbeddingSine` for an (H, W) map: [H, W, num_pos_feats], y then x.

    A constant of the map's shape, computed in float64 and rounded once (SAM 2 computes it in
    float32 on the fly).
    """
    h, w = grid
    y = np.arange(1, h + 1, dtype=np.float64)
    x = np.arange(1, w + 1, dtype=np.float64)
    if config.normalize:
        scale = 2 * math.pi if config.scale is None else config.scale
        eps = 1e-6
        y = y / (y[-1] + eps) * scale
        x = x / (x[-1] + eps) * scale
    feats = config.num_pos_feats // 2
    dim_t = config.temperature ** (2 * (np.arange(feats) // 2) / feats)

    def encode(pos):  # [n] -> [n, feats]: sin at even, cos at odd channels, interleaved
        angles = pos[:, None] / dim_t
        return np.stack([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=2).reshape(
            len(pos), feats
        )

    pos_y = np.broadcast_to(encode(y)[:, None, :], (h, w, feats))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (h, w, feats))
    return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)


def upsample2x(x: jnp.ndarray, mode: str) -> jnp.ndarray:
    """[B, H, W, C] -> [B, 2H, 2W, C] as torch's `F.interpolate(scale_factor=2.0)`."""
    if mode == "nearest":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    h, w = x.shape[1:3]  # bilinear, align_corners=False: separable constant matrices
    mh = interpolation_matrix(h, 2 * h, "linear").astype(np.float32)
    mw = interpolation_matrix(w, 2 * w, "linear").astype(np.float32)
    return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=jax.lax.Precision.HIGHEST).astype(
        x.dtype
    )


class FpnNeck(nn.Module):
    """Per-stage maps (finest first) -> (fused maps, sine position encodings), finest first."""

    config: FpnNeckConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, xs: Sequence[jnp.ndarray]) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
        cfg = self.config
        n = len(xs) - 1
        top_down = range(len(xs)) if cfg.fpn_top_down_levels is None else cfg.fpn_top_down_levels
        out: list[Any] = [None] * len(xs)
        pos: list[Any] = [None] * len(xs)
        prev = None
        for i in range(n, -1, -1):  # coarsest first
            x = xs[i]
            k = cfg.kernel_size
            lateral = nn.Conv(
                cfg.d_model,
                (k, k),
                strides=(cfg.stride, cfg.stride),
                padding=[(cfg.padding, cfg.padding)] * 2,
                dtype=self.dtype,
                name=f"convs_{n - i}",  # SAM 2 numbers its convs coarsest first
                **fusion_head_init((k, k), x.shape[-1]),  # torch's Conv2d default init
            )(x)
            if i in top_down and prev is not None:
                if tuple(lateral.shape[1:3]) != tuple(2 * s for s in prev.shape[1:3]):
                    raise ValueError(
                        f"level {i} is {lateral.shape[1:3]}, not twice the coarser level's "
                        f"{prev.shape[1:3]}: top-down fusion upsamples by exactly 2"
                    )
                prev = lateral + upsample2x(prev, cfg.fpn_interp_model)
                if cfg.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
            table = sine_position_encoding(prev.shape[1:3], cfg)
            pos[i] = jnp.broadcast_to(jnp.asarray(table, prev.dtype), (prev.shape[0], *table.shape))
        return out, pos


class ImageEncoder(nn.Module):
    """SAM 2's `ImageEncoder`: HieraDet trunk + FPN neck on NHWC images.

    Returns SAM 2's dict: `vision_features` [B, H', W', d_model] (the last kept level),
    `vision_pos_enc` and `backbone_fpn` (lists, finest first, the `scalp` coarsest dropped).
    """

    trunk: HieraDetConfig
    neck: FpnNeckConfig = FpnNeckConfig()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> dict[str, Any]:
        _, maps = HieraDet(self.trunk, name="trunk")(x, return_intermediates=True, train=train)
        if self.neck.scalp >= len(maps):
            raise ValueError(f"scalp={self.neck.scalp} drops all {len(maps)} levels")
        features, pos = FpnNeck(self.neck, jnp.dtype(self.trunk.dtype), name="neck")(maps)
        if self.neck.scalp > 0:
            features, pos = features[: -self.neck.scalp], pos[: -self.neck.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
