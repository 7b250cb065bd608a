"""Hiera configuration and the registry of official variants.

`HieraConfig` carries the keyword arguments of the official `Hiera` / `MaskedAutoencoderHiera`
constructors under the same names, so a config reads like the PyTorch call that built the
checkpoint. Everything the modules need that follows from those arguments (per-block widths,
window sizes, unroll schedules) is derived here once, in plain Python, so the modules only see
static shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one encoder block, as the official constructor loop computes it."""

    dim: int
    dim_out: int
    heads: int
    q_stride: int  # flattened q-pool stride (4 for 2x2), 1 = no pooling
    window_size: int  # flattened mask-unit size after pooling
    use_mask_unit_attn: bool
    drop_path: float


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    """Hyper-parameters of a Hiera model; field names follow the official `Hiera` kwargs."""

    input_size: Shape = (224, 224)  # (H, W) for images, (T, H, W) for video
    in_chans: int = 3
    embed_dim: int = 96  # width of the first stage
    num_heads: int = 1  # heads of the first stage
    num_classes: int = 1000
    stages: Shape = (2, 3, 16, 3)  # blocks per stage
    q_pool: int = 3  # number of stage transitions that pool queries
    q_stride: Shape = (2, 2)
    mask_unit_size: Shape = (8, 8)  # in tokens
    mask_unit_attn: tuple[bool, ...] = (True, True, False, False)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    patch_kernel: Shape = (7, 7)
    patch_stride: Shape = (4, 4)
    patch_padding: Shape = (3, 3)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    norm_layer: str = "LayerNorm"  # the only norm the official models use (eps 1e-6)
    head_dropout: float = 0.0
    head_init_scale: float = 0.001
    sep_pos_embed: bool = False  # separate spatial/temporal position embeddings (video)
    # timm-only options (`timm.models.hiera.Hiera` kwargs, used by the *_abswin_* variants).
    abs_win_pos_embed: bool = False  # global table resized to the grid + a tiled window table
    global_pos_size: Shape = (14, 14)  # grid of the global table with abs_win_pos_embed
    init_values: float | None = None  # LayerScale (`ls1`/`ls2.gamma`) initial value; None = off
    use_expand_proj: bool = True  # False: widen by concatenating max- and avg-pooled x
    weight_init: str = ""  # "" = the official init; "jax" = timm's jax init and fix_init
    # MAE decoder (official `MaskedAutoencoderHiera` kwargs) and masking.
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.6  # fraction of mask units dropped (0.6 images, 0.9 video)
    # Execution switches: they change speed and memory, never the parameters.
    dtype: str = "float32"  # compute dtype; parameters always stay float32
    remat: bool = False  # rematerialise each block in the backward pass
    # Each run of identical blocks as one lax.scan (compiled once). None = on, except when
    # tracing for a GPU, where the unrolled blocks ran 25% faster (BENCHMARKS.md).
    scan_blocks: bool | None = None

    def __post_init__(self) -> None:
        # Accept lists (JSON, command lines) but store tuples, so configs stay hashable.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError for a config the official code would reject or mis-shape."""
        dims = len(self.input_size)
        if dims not in (2, 3):
            raise ValueError(f"input_size must be (H, W) or (T, H, W), got {self.input_size}")
        if any(isinstance(s, bool) or int(s) != s or s < 1 for s in self.input_size):
            raise ValueError(f"input_size must hold positive integers, got {self.input_size}")
        if int(self.in_chans) != self.in_chans or self.in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {self.in_chans}")
        for name in ("q_stride", "mask_unit_size", "patch_kernel", "patch_stride", "patch_padding"):
            if len(getattr(self, name)) != dims:
                raise ValueError(
                    f"{name}={getattr(self, name)} has {len(getattr(self, name))} dims but "
                    f"input_size={self.input_size} has {dims}"
                )
        if self.abs_win_pos_embed:
            if self.sep_pos_embed or dims != 2:
                raise ValueError(
                    "abs_win_pos_embed is for image models (2-D input_size, sep_pos_embed=False)"
                )
            if len(self.global_pos_size) != 2 or min(self.global_pos_size) < 1:
                raise ValueError(
                    f"global_pos_size must be (H, W) of positive sizes, got {self.global_pos_size}"
                )
        if self.weight_init not in ("", "jax"):
            raise ValueError(
                f"weight_init must be '' (official) or 'jax', got {self.weight_init!r}"
            )
        if not self.use_expand_proj and self.dim_mul != 2.0:
            raise ValueError(
                "use_expand_proj=False widens by concatenating two pooled copies, so it needs "
                f"dim_mul=2, got {self.dim_mul}"
            )
        if self.norm_layer != "LayerNorm":
            raise ValueError(f"norm_layer={self.norm_layer!r} is not supported; use 'LayerNorm'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if len(self.stages) < 1 or min(self.stages) < 1:
            raise ValueError(f"stages must be positive block counts, got {self.stages}")
        if len(self.mask_unit_attn) != len(self.stages):
            raise ValueError(
                f"mask_unit_attn has {len(self.mask_unit_attn)} entries but there are "
                f"{len(self.stages)} stages"
            )
        if not 0 <= self.q_pool < len(self.stages):
            raise ValueError(
                f"q_pool={self.q_pool} is too large: it must be at least 0 and less than the "
                f"number of stages ({len(self.stages)})"
            )
        for size, stride in zip(self.input_size, self.patch_stride):
            if size % stride:
                raise ValueError(
                    f"input_size {self.input_size} is not divisible by patch_stride "
                    f"{self.patch_stride}"
                )
        unroll_stride = [s ** (len(self.stages) - 1) for s in self.q_stride]
        for tokens, stride in zip(self.tokens_spatial_shape, unroll_stride):
            if tokens % stride:
                raise ValueError(
                    f"the token grid {self.tokens_spatial_shape} (input_size / patch_stride) "
                    f"must be divisible by q_stride ** (len(stages) - 1) = {tuple(unroll_stride)}"
                )
        for tokens, mu in zip(self.tokens_spatial_shape, self.mask_unit_size):
            if tokens % mu:
                raise ValueError(
                    f"the token grid {self.tokens_spatial_shape} is not divisible by "
                    f"mask_unit_size {self.mask_unit_size}"
                )
        pooled = [s**self.q_pool for s in self.q_stride]
        for mu, stride in zip(self.mask_unit_size, pooled):
            if mu % stride:
                raise ValueError(
                    f"mask_unit_size {self.mask_unit_size} is not divisible by the pooled stride "
                    f"q_stride ** q_pool = {tuple(pooled)}"
                )
        for spec in self.block_specs:
            if spec.dim_out % spec.heads:
                raise ValueError(
                    f"a block of width {spec.dim_out} cannot split into {spec.heads} heads"
                )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim={self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads={self.decoder_num_heads}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    # ------------------------------------------------------------------ derived shapes
    @property
    def is_video(self) -> bool:
        return len(self.input_size) == 3

    @property
    def tokens_spatial_shape(self) -> Shape:
        return tuple(i // s for i, s in zip(self.input_size, self.patch_stride))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.tokens_spatial_shape)

    @property
    def mask_spatial_shape(self) -> Shape:
        return tuple(t // m for t, m in zip(self.tokens_spatial_shape, self.mask_unit_size))

    @property
    def num_mask_units(self) -> int:
        return math.prod(self.mask_spatial_shape)

    @property
    def num_kept_mask_units(self) -> int:
        """Kept mask units per example; the same rounding as official `get_random_mask`."""
        return int(self.num_mask_units * (1 - self.mask_ratio))

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        return tuple(sum(self.stages[:i]) - 1 for i in range(1, len(self.stages) + 1))

    @property
    def unroll_schedule(self) -> tuple[Shape, ...]:
        return (tuple(self.q_stride),) * (len(self.stages) - 1)

    @property
    def block_specs(self) -> tuple[BlockSpec, ...]:
        """Per-block widths, heads, pooling and windows: the official constructor loop."""
        embed_dim, num_heads = self.embed_dim, self.num_heads
        flat_mu_size = math.prod(self.mask_unit_size)
        flat_q_stride = math.prod(self.q_stride)
        stage_ends = self.stage_ends
        q_pool_blocks = [end + 1 for end in stage_ends[: self.q_pool]]
        depth = self.depth
        # Linear from 0 to drop_path_rate over the blocks (official torch.linspace rule).
        rates = [self.drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        specs, stage = [], 0
        for i in range(depth):
            dim_out = embed_dim
            use_mask_unit_attn = self.mask_unit_attn[stage]  # lags one block behind the stage
            if i - 1 in stage_ends:
                dim_out = int(embed_dim * self.dim_mul)
                num_heads = int(num_heads * self.head_mul)
                stage += 1
                if i in q_pool_blocks:
                    flat_mu_size //= flat_q_stride
            specs.append(
                BlockSpec(
                    dim=embed_dim,
                    dim_out=dim_out,
                    heads=num_heads,
                    q_stride=flat_q_stride if i in q_pool_blocks else 1,
                    window_size=flat_mu_size,
                    use_mask_unit_attn=use_mask_unit_attn,
                    drop_path=rates[i],
                )
            )
            embed_dim = dim_out
        return tuple(specs)

    @property
    def block_runs(self) -> tuple[tuple[int, int], ...]:
        """[start, stop) runs of consecutive blocks of one stage that differ only in drop path.

        A stage's first block may change width, pool queries or switch attention (the switch
        lags one block); the blocks after it are the same block. `scan_blocks` runs each run of
        two or more blocks as one scan. Every block is in exactly one run, in order.
        """
        specs = self.block_specs
        stage_ends = set(self.stage_ends)

        def shape(spec: BlockSpec) -> BlockSpec:
            return dataclasses.replace(spec, drop_path=0.0)

        runs, start = [], 0
        for i in range(1, len(specs) + 1):
            if i == len(specs) or i - 1 in stage_ends or shape(specs[i]) != shape(specs[start]):
                runs.append((start, i))
                start = i
        return tuple(runs)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        specs = self.block_specs
        return tuple(specs[end].dim_out for end in self.stage_ends)

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    def reroll_plan(self, stage: int) -> tuple[tuple[Shape, ...], Shape]:
        """(strides still unrolled, token grid) at the end of `stage`, as official `Reroll`."""
        consumed = min(stage, self.q_pool)
        schedule = self.unroll_schedule[consumed:]
        size = self.tokens_spatial_shape
        for strides in self.unroll_schedule[:consumed]:
            size = tuple(n // s for n, s in zip(size, strides))
        return schedule, size

    def check_masking_supported(self) -> None:
        """ValueError unless mask units are exactly the unrolled windows, as masking requires.

        After unrolling, token n belongs to window n % (#tokens / q_stride**(len(stages)-1));
        dropping mask units by that index (the official recipe) is only right when those
        windows are the mask units. Every official model satisfies this (8 = 2**3).
        """
        window = tuple(s ** (len(self.stages) - 1) for s in self.q_stride)
        if tuple(self.mask_unit_size) != window:
            raise ValueError(
                f"masking needs mask_unit_size == q_stride ** (len(stages) - 1) = {window}, "
                f"got {tuple(self.mask_unit_size)}: with {len(self.stages)} stages the unrolled "
                f"windows are {window} tokens"
            )

    # MAE shapes ------------------------------------------------------------------
    @property
    def mask_unit_spatial_shape_final(self) -> Shape:
        return tuple(m // s**self.q_pool for m, s in zip(self.mask_unit_size, self.q_stride))

    @property
    def tokens_spatial_shape_final(self) -> Shape:
        return tuple(t // s**self.q_pool for t, s in zip(self.tokens_spatial_shape, self.q_stride))

    @property
    def pred_stride(self) -> int:
        """Pixel size of one MAE prediction token."""
        return self.patch_stride[-1] * self.q_stride[-1] ** self.q_pool

    @property
    def pred_dim(self) -> int:
        return self.pred_stride ** min(2, len(self.q_stride)) * self.in_chans

    # ------------------------------------------------------------------ (de)serialisation
    def replace(self, **overrides: Any) -> HieraConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown HieraConfig field(s) {unknown}; known fields: {known}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HieraConfig:
        return cls().replace(**dict(values))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------- variants
_IMAGE = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4)),
    "huge": dict(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4)),
}
_VIDEO_INPUT = dict(
    num_classes=400,  # Kinetics-400
    input_size=(16, 224, 224),
    q_stride=(1, 2, 2),
    mask_unit_size=(1, 8, 8),
    patch_kernel=(3, 7, 7),
    patch_stride=(2, 4, 4),
    patch_padding=(1, 3, 3),
    sep_pos_embed=True,
    mask_ratio=0.9,
)
_MAE = dict(q_pool=2)  # the official MAE models pool twice, the classifiers three times


def _build_variants() -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {}
    for size, kw in _IMAGE.items():
        variants[f"hiera_{size}_224"] = dict(kw)
        variants[f"mae_hiera_{size}_224"] = dict(kw, **_MAE)
    for size in ("base", "base_plus", "large", "huge"):
        variants[f"hiera_{size}_16x224"] = dict(_IMAGE[size], **_VIDEO_INPUT)
        variants[f"mae_hiera_{size}_16x224"] = dict(_IMAGE[size], **_VIDEO_INPUT, **_MAE)
    return variants


VARIANTS: dict[str, dict[str, Any]] = _build_variants()

# Variants that only timm defines (`timm.models.hiera`), with timm's kwargs and input size.
# Kept apart from VARIANTS (the official models): no official checkpoint or module exists.
TIMM_VARIANTS: dict[str, dict[str, Any]] = {
    "hiera_small_abswin_256": dict(
        _IMAGE["small"],
        input_size=(256, 256),
        abs_win_pos_embed=True,
        global_pos_size=(16, 16),
        init_values=1e-5,
        weight_init="jax",
        use_expand_proj=False,
    ),
    "hiera_base_abswin_256": dict(
        _IMAGE["base"],
        input_size=(256, 256),
        abs_win_pos_embed=True,
        init_values=1e-5,
        weight_init="jax",
    ),
}


def list_models(include_timm: bool = False) -> list[str]:
    """Names of every official variant, classification (`hiera_*`) and MAE (`mae_hiera_*`).

    `include_timm=True` adds the timm-only variants (`hiera_{small,base}_abswin_256`).
    """
    return sorted({**VARIANTS, **TIMM_VARIANTS} if include_timm else VARIANTS)


def is_pretraining_name(name: str) -> bool:
    return name.startswith("mae_")


def get_config(name: str, **overrides: Any) -> HieraConfig:
    """The config of an official variant, with explicit keyword overrides applied on top."""
    variants = {**VARIANTS, **TIMM_VARIANTS}
    if name not in variants:
        known = ", ".join(list_models(include_timm=True))
        raise ValueError(f"unknown model name {name!r}; known models: {known}")
    return HieraConfig().replace(**{**variants[name], **overrides})


def resolve_config(name_or_config: str | HieraConfig, **overrides: Any) -> HieraConfig:
    if isinstance(name_or_config, HieraConfig):
        return name_or_config.replace(**overrides) if overrides else name_or_config
    return get_config(name_or_config, **overrides)
