"""SAM 2's Hiera image-encoder trunk ("HieraDet"), computed as timm's `hieradet_sam2.HieraDet`.

It is not the Hiera of `hiera.py`: tokens stay a [B, H, W, C] map (no unroll), attention runs
inside square windows (the map zero-padded to whole windows, the padding cropped after) or over
the whole map at fixed blocks, queries are max-pooled inside each window where a stage starts,
and the position embedding is a background table resized bicubically to the token grid plus a
window table tiled over it. Any input size whose token grid is a whole number of first-stage
windows runs, as in timm and SAM 2. Submodule names mirror timm's state-dict keys
(`blocks_3/attn/qkv`, `mlp/fc1`), so `hiera_jax.weights.hieradet_convert` is a rename plus
layout transposes.
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

from hiera_jax.models.attention import attention, window_attention
from hiera_jax.models.kernels import fused_mlp
from hiera_jax.models.kernels.matmul import Dense
from hiera_jax.models.kernels.tpu import check_kernel
from hiera_jax.models.layers import (
    INIT_STD,
    DenseParams,
    DropPath,
    LayerNorm,
    LayerScale,
    PatchEmbed,
)
from hiera_jax.models.pos_embed import interpolation_matrix

Grid = tuple[int, int]
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block as timm's constructor loop builds it."""

    dim: int
    dim_out: int
    heads: int
    window: int  # window side in tokens before any pooling; 0 = global attention
    q_stride: Grid | None  # query (and residual) max-pool stride; None = no pooling
    drop_path: float


@dataclasses.dataclass(frozen=True)
class HieraDetConfig:
    """Hyper-parameters of a HieraDet trunk, named as timm's `HieraDet` keyword arguments.

    Lists are stored as tuples and an int `input_size` as a square, so equal configs compare
    equal; a value the model cannot run is a ValueError at construction.
    """

    embed_dim: int = 96  # width of the first stage
    num_heads: int = 1  # heads of the first stage, times head_mul at every stage change
    stages: tuple[int, ...] = (2, 3, 16, 3)  # blocks per stage
    q_pool: int = 3  # number of stage changes that pool queries
    q_stride: Grid = (2, 2)  # pool stride at those changes
    dim_mul: float = 2.0  # width factor at every stage change
    head_mul: float = 2.0  # heads factor at every stage change
    window_spec: tuple[int, ...] = (8, 4, 14, 7)  # window side per stage, 0 = global
    global_att_blocks: tuple[int, ...] = (12, 16, 20)  # blocks attending over the whole map
    global_pos_size: Grid = (7, 7)  # background table; SAM 2's window_pos_embed_bkg_spatial_size
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0  # stochastic depth, linear from 0 over the blocks
    init_values: float | None = None  # LayerScale (`ls1`/`ls2.gamma`) initial value; None = off
    in_chans: int = 3
    input_size: Grid = (1024, 1024)  # (H, W) used to initialise; any valid size runs
    patch_kernel: Grid = (7, 7)
    patch_stride: Grid = (4, 4)
    patch_padding: Grid = (3, 3)
    layer_norm_eps: float = 1e-6  # timm's LayerNorm and SAM 2's both use 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention_kernel: str = "auto"  # hiera_jax.models.attention: a Pallas kernel on TPU
    mlp_kernel: str = (
        "auto"  # hiera_jax.models.kernels.fused_mlp: norm2 + MLP + residual, TPU kernel
    )
    remat: bool = False  # rematerialise each block in the backward pass (training memory)
    # HieraDetForImageClassification only (timm's `ClNormMlpClassifierHead`: mean pool, norm, fc).
    num_classes: int = 1000
    head_init_scale: float = 0.001  # timm scales the zero-bias, trunc-normal head weights by this

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, int) and not isinstance(size, bool):
            object.__setattr__(self, "input_size", (size, size))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self._validate()

    def replace(self, **changes: Any) -> HieraDetConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def positive_ints(name: str, value: Any, allow_zero: bool = False) -> None:
            values = value if isinstance(value, tuple) else (value,)
            low = 0 if allow_zero else 1
            if not values or any(
                isinstance(v, bool) or not isinstance(v, int) or v < low for v in values
            ):
                kind = "integers >= 0" if allow_zero else "positive integers"
                raise ValueError(f"{name} must be {kind}, got {value!r}")

        for name in ("embed_dim", "num_heads", "in_chans", "stages"):
            positive_ints(name, getattr(self, name))
        for name in ("q_stride", "global_pos_size", "input_size", "patch_kernel", "patch_stride"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 2:
                raise ValueError(f"{name} must be a pair (H, W), got {value!r}")
            positive_ints(name, value)
        if not isinstance(self.patch_padding, tuple) or len(self.patch_padding) != 2:
            raise ValueError(f"patch_padding must be a pair (H, W), got {self.patch_padding!r}")
        positive_ints("patch_padding", self.patch_padding, allow_zero=True)
        if not isinstance(self.window_spec, tuple) or len(self.window_spec) != len(self.stages):
            raise ValueError(
                f"window_spec {self.window_spec!r} needs one window per stage "
                f"({len(self.stages)} stages)"
            )
        positive_ints("window_spec", self.window_spec, allow_zero=True)
        if self.window_spec[0] < 1:
            raise ValueError(
                "window_spec[0] must be >= 1: it is the side of the tiled window position table"
            )
        if not isinstance(self.global_att_blocks, tuple):
            raise ValueError(f"global_att_blocks must be a list, got {self.global_att_blocks!r}")
        if any(
            isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.depth
            for b in self.global_att_blocks
        ):
            raise ValueError(
                f"global_att_blocks {self.global_att_blocks} must be block indices in "
                f"[0, {self.depth})"
            )
        if isinstance(self.q_pool, bool) or not isinstance(self.q_pool, int):
            raise ValueError(f"q_pool must be an integer, got {self.q_pool!r}")
        if not 0 <= self.q_pool <= len(self.stages) - 1:
            raise ValueError(
                f"q_pool={self.q_pool} must be in [0, {len(self.stages) - 1}] (the number of "
                "stage changes)"
            )
        for name in ("dim_mul", "head_mul", "mlp_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        positive_ints("num_classes", self.num_classes)
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_kernel(self.attention_kernel, "attention_kernel")
        check_kernel(self.mlp_kernel, "mlp_kernel")
        for i, spec in enumerate(self.block_specs):
            if spec.heads < 1 or spec.dim_out % spec.heads:
                raise ValueError(
                    f"block {i} of width {spec.dim_out} cannot split into {spec.heads} heads"
                )
            if spec.q_stride is not None and spec.dim == spec.dim_out:
                raise ValueError(
                    f"block {i} pools queries but keeps its width {spec.dim}: the residual is "
                    "only pooled through the width projection (timm and SAM 2 alike), so dim_mul "
                    "must change the width where queries are pooled"
                )
            if (
                spec.q_stride is not None
                and spec.window
                and any(spec.window % s for s in spec.q_stride)
            ):
                raise ValueError(
                    f"block {i} pools {spec.q_stride} inside windows of {spec.window} tokens: "
                    "the window must be divisible by q_stride"
                )
        self.stage_grids(self.input_size)

    # ------------------------------------------------------------------ derived shapes
    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        return tuple(sum(self.stages[:i]) - 1 for i in range(1, len(self.stages) + 1))

    @property
    def q_pool_blocks(self) -> tuple[int, ...]:
        return tuple(end + 1 for end in self.stage_ends[:-1])[: self.q_pool]

    @property
    def block_specs(self) -> tuple[BlockSpec, ...]:
        """Per-block widths, heads, windows and pooling, by timm's (and SAM 2's) loop.

        The window lags by a block: a stage's first block still uses the previous stage's
        window (shrunk by the pool inside it).
        """
        depth = self.depth
        rates = [self.drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        dim, heads, stage, specs = self.embed_dim, self.num_heads, 0, []
        for i in range(depth):
            dim_out = dim
            window = 0 if i in self.global_att_blocks else self.window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(dim * self.dim_mul)
                heads = int(heads * self.head_mul)
                stage += 1
            q_stride = tuple(self.q_stride) if i in self.q_pool_blocks else None
            specs.append(BlockSpec(dim, dim_out, heads, window, q_stride, rates[i]))
            dim = dim_out
        return tuple(specs)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage's output map."""
        return tuple(self.block_specs[end].dim_out for end in self.stage_ends)

    def token_grid(self, image_hw: Sequence[int]) -> Grid:
        """(H, W) of the patch embedding's output for an image of `image_hw` pixels."""
        return tuple(
            (size + 2 * p - k) // s + 1
            for size, k, s, p in zip(
                image_hw, self.patch_kernel, self.patch_stride, self.patch_padding
            )
        )

    def stage_grids(self, image_hw: Sequence[int]) -> tuple[Grid, ...]:
        """(H, W) of each stage's output map; ValueError for an image the model cannot run."""
        image_hw = tuple(int(s) for s in image_hw)
        grid = self.token_grid(image_hw)
        side = self.window_spec[0]
        if min(grid) < 1 or any(g % side for g in grid):
            raise ValueError(
                f"an image of {image_hw} pixels gives a {grid} token grid, which is not a whole "
                f"number of {side}x{side} windows (the tiled window position table): use a "
                f"size that is a positive multiple of {side * self.patch_stride[0]}x"
                f"{side * self.patch_stride[1]} pixels"
            )
        grids = []
        for i, spec in enumerate(self.block_specs):
            if spec.q_stride is not None:
                pooled = tuple(g // s for g, s in zip(grid, spec.q_stride))
                if min(pooled) < 1:
                    raise ValueError(
                        f"an image of {image_hw} pixels is too small: block {i} would pool "
                        f"the {grid} token grid by {spec.q_stride} to nothing"
                    )
                if spec.window:
                    small = tuple(spec.window // s for s in spec.q_stride)
                    before = [math.ceil(g / spec.window) for g in grid]
                    after = [math.ceil(g / w) for g, w in zip(pooled, small)]
                    if before != after:
                        raise ValueError(
                            f"an image of {image_hw} pixels: block {i} pools {grid} tokens in "
                            f"windows of {spec.window}, and the pooled windows do not tile "
                            f"the pooled grid {pooled} (timm and SAM 2 fail here too)"
                        )
                grid = pooled
            if i in self.stage_ends:
                grids.append(grid)
        return tuple(grids)


VARIANTS: dict[str, HieraDetConfig] = {
    "sam2_hiera_tiny": HieraDetConfig(stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9)),
    "sam2_hiera_small": HieraDetConfig(stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13)),
    "sam2_hiera_base_plus": HieraDetConfig(embed_dim=112, num_heads=2, global_pos_size=(14, 14)),
    "sam2_hiera_large": HieraDetConfig(
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_spec=(8, 4, 16, 8),
    ),
}


def get_config(name: str, **overrides: Any) -> HieraDetConfig:
    """A registered variant (timm's name), with any field overridden."""
    if name not in VARIANTS:
        raise ValueError(f"unknown HieraDet variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name].replace(**overrides)


# ---------------------------------------------------------------------- helpers
def max_pool(x: jnp.ndarray, stride: Sequence[int]) -> jnp.ndarray:
    """Max-pool [..., H, W, C] with kernel = stride, dropping a remainder (torch's floor mode)."""
    sh, sw = stride
    *lead, h, w, c = x.shape
    x = x[..., : h // sh * sh, : w // sw * sw, :]
    x = x.reshape(*lead, h // sh, sh, w // sw, sw, c)
    return x.max(axis=(-4, -2))


def _pad_to(size: int, window: int) -> int:
    return -(-size // window) * window


# A layout of the token map between blocks: None is the [B, H, W, C] map; (window, strides) its
# [B, nW, n, C] tokens of each (wh, ww) window (windows row-major, none padded), ordered so that
# each pool in `strides` (the first first) max-pools over leading chunks, as Hiera's unroll
# orders its tokens: a window row y = ((r·s_k + i_k)·...)·s_1 + i_1 sits at offset (i_1, j_1,
# ..., i_k, j_k, r, c). Every op of a block but attention is per token, and attention is per
# window, so a run of blocks in the same windows needs no copies between them, and no pool needs
# the stride-first reorder.
Layout = tuple[Grid, tuple[Grid, ...]] | None


def _unroll_axes(k: int) -> tuple[int, ...]:
    """The transpose from [B, nH, rh, s_k..s_1 (h), nW, rw, s_k..s_1 (w), C] to the token order."""
    pairs = [(3 + k - j, 5 + 2 * k - j) for j in range(1, k + 1)]
    return (0, 1, 3 + k, *(a for pair in pairs for a in pair), 2, 4 + k, 5 + 2 * k)


def _window_shape(x_shape, grid: Grid, window: Grid, strides: tuple[Grid, ...]) -> tuple:
    b, c = x_shape[0], x_shape[-1]
    sh, sw = [s[0] for s in reversed(strides)], [s[1] for s in reversed(strides)]
    rh, rw = window[0] // math.prod(sh), window[1] // math.prod(sw)
    return (b, grid[0] // window[0], rh, *sh, grid[1] // window[1], rw, *sw, c)


def unroll_windows(x: jnp.ndarray, window: Grid, strides: tuple[Grid, ...]) -> jnp.ndarray:
    """[B, H, W, C] (whole windows) -> [B, nW, wh·ww, C] in the `Layout` order."""
    b, h, w, c = x.shape
    x = x.reshape(_window_shape(x.shape, (h, w), window, strides))
    x = x.transpose(_unroll_axes(len(strides)))
    return x.reshape(b, (h // window[0]) * (w // window[1]), window[0] * window[1], c)


def roll_windows(
    x: jnp.ndarray, grid: Grid, window: Grid, strides: tuple[Grid, ...]
) -> jnp.ndarray:
    """The inverse of `unroll_windows`: [B, nW, wh·ww, C] -> the [B, H, W, C] map of `grid`."""
    shape = _window_shape(x.shape, grid, window, strides)
    axes = _unroll_axes(len(strides))
    x = x.reshape([shape[a] for a in axes])
    return x.transpose(np.argsort(axes)).reshape(x.shape[0], *grid, x.shape[-1])


def relayout(x: jnp.ndarray, grid: Grid, have: Layout, want: Layout) -> jnp.ndarray:
    """The map of `grid` tokens from one `Layout` to another (one transpose at most)."""
    if have == want:
        return x
    if have is not None:
        x = roll_windows(x, grid, *have)
    return x if want is None else unroll_windows(x, *want)


def _block_windows(spec: BlockSpec, grid: Grid) -> Grid | None:
    """The windows block `spec` attends in, if they tile the `grid` map without padding and
    divide its pool (global attention: the whole map); None where the block takes the map
    (padded to whole windows, or floor-pooled)."""
    window = (spec.window, spec.window) if spec.window else grid
    stride = spec.q_stride or (1, 1)
    if any(g % w or w % s for g, w, s in zip(grid, window, stride)):
        return None
    return window


def block_layouts(specs: Sequence[BlockSpec], grid: Grid) -> list[Layout]:
    """Each block's input `Layout`: runs of blocks in the same windows (a pool keeps the window
    grid, shrinking each window), their tokens ordered for every pool of the run."""
    windows, grids = [], [grid]
    for spec in specs:
        windows.append(_block_windows(spec, grids[-1]))
        stride = spec.q_stride or (1, 1)
        grids.append(tuple(g // s for g, s in zip(grids[-1], stride)))
    layouts: list[Layout] = [None] * len(specs)
    for i in reversed(range(len(specs))):
        if windows[i] is None:
            continue
        pool = (specs[i].q_stride,) if specs[i].q_stride else ()
        stride = specs[i].q_stride or (1, 1)
        after = tuple(w // s for w, s in zip(windows[i], stride))
        runs_on = i + 1 < len(specs) and windows[i + 1] == after and layouts[i + 1] is not None
        layouts[i] = (windows[i], pool + (layouts[i + 1][1] if runs_on else ()))
    return layouts


def pooled_layout(layout: Layout, stride: Grid | None) -> Layout:
    """A block's output `Layout`: its input's, each window shrunk by the pool it took."""
    if layout is None or stride is None:
        return layout
    (wh, ww), strides = layout
    return (wh // stride[0], ww // stride[1]), strides[1:]


def pos_embed(background: jnp.ndarray, window: jnp.ndarray, grid: Grid) -> jnp.ndarray:
    """[1, H, W, C]: the background table resized to `grid` plus the window table tiled.

    The resize is torch's `F.interpolate(mode="bicubic", align_corners=False)` (a = -0.75, no
    antialias), as a pair of constant matrices (hiera_jax.models.pos_embed).
    """
    _, gh, gw, _ = background.shape
    _, wh, ww, _ = window.shape
    mh = interpolation_matrix(gh, grid[0]).astype(np.float32)
    mw = interpolation_matrix(gw, grid[1]).astype(np.float32)
    resized = jnp.einsum(
        "oh,bhwc,pw->bopc", mh, background, mw, precision=jax.lax.Precision.HIGHEST
    )
    return resized + jnp.tile(window, (1, grid[0] // wh, grid[1] // ww, 1))


def _dense_init(rescale: float = 1.0) -> dict:
    """timm's `init_weight_vit` for Linear (trunc-normal 0.02, bias 0.02), the weight times
    `rescale` (its `fix_init_weight` for attn.proj and mlp.fc2)."""

    def kernel(key, shape, dtype=jnp.float32):
        return nn.initializers.normal(INIT_STD)(key, shape, dtype) * rescale

    return dict(kernel_init=kernel, bias_init=nn.initializers.constant(INIT_STD))


# ---------------------------------------------------------------------- modules
class MultiScaleAttention(nn.Module):
    """Attention inside each window, queries optionally max-pooled within their window."""

    dim_out: int
    heads: int
    q_stride: Grid | None = None
    dtype: jnp.dtype = jnp.float32
    proj_rescale: float = 1.0
    attention_kernel: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, nW, n, C] window tokens in a `Layout` order (pooled over leading chunks) ->
        [B, nW, n', dim_out]; or one [B, 1, H, W, C] window the stride does not divide ->
        [B, 1, H', W', dim_out] (floor pooling)."""
        head_dim = self.dim_out // self.heads
        qkv = Dense(3 * self.dim_out, dtype=self.dtype, name="qkv", **_dense_init())(x)
        stride = self.q_stride or (1, 1)
        proj = Dense(self.dim_out, dtype=self.dtype, name="proj", **_dense_init(self.proj_rescale))
        if x.ndim == 4:
            # Each window as one batch row of Hiera's token attention, which reads the
            # projection's [n, 3·C] rows as they are (on TPU a kernel, no q/k/v relayouts); the
            # pool is over leading chunks, as Hiera's; keys in any order.
            b, nw, n, _ = x.shape
            rows = qkv.reshape(b * nw, n, 3 * self.dim_out)
            pool = stride[0] * stride[1]
            out = attention(
                rows, self.heads, 1, head_dim**-0.5, q_stride=pool, kernel=self.attention_kernel
            )
            return proj(out.reshape(b, nw, n // pool, self.dim_out))
        # A pooled map the stride does not divide (floor pooling drops its edge): q pooled alone.
        b, nw = x.shape[:2]
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each [B, nW, wh, ww, dim_out], heads-major
        if self.q_stride is not None:
            q = max_pool(q, self.q_stride)
        qh, qw = q.shape[2:4]

        def heads_first(t):  # [B, nW, h, w, heads·d] -> [B, nW, heads, h·w, d]
            return t.reshape(b, nw, -1, self.heads, head_dim).transpose(0, 1, 3, 2, 4)

        out = window_attention(
            heads_first(q), heads_first(k), heads_first(v), head_dim**-0.5, self.attention_kernel
        )
        return proj(out.transpose(0, 1, 3, 2, 4).reshape(b, nw, qh, qw, self.dim_out))


class MultiScaleBlock(nn.Module):
    """Pre-norm block on a [B, H, W, C] map: windowed or global attention, then the MLP.

    Where the width changes, the residual is max-pool(proj(norm1(x))), as in timm and SAM 2.
    """

    dim_out: int
    heads: int
    window: int = 0  # 0 = global attention
    q_stride: Grid | None = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    init_values: float | None = None
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    init_rescale: float = 1.0  # timm fix_init: attn.proj and mlp.fc2 weights times this
    attention_kernel: str = "auto"
    mlp_kernel: str = "auto"
    # x arrives (and leaves) as [B, nW, n, C]: the tokens of the windows it attends in, in a
    # `Layout` order (pooled over leading chunks), not padded; otherwise as the map.
    windowed: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """[B, H, W, dim] -> [B, H', W', dim_out] (H' = H // q_stride when pooling); windowed:
        [B, nW, n, dim] -> [B, nW, n', dim_out] (n' = n / (sh·sw))."""
        dim = x.shape[-1]
        shortcut = x
        x = LayerNorm(self.norm_eps, self.dtype, name="norm1")(x)
        if dim != self.dim_out:
            shortcut = Dense(self.dim_out, dtype=self.dtype, name="proj", **_dense_init())(x)
            if self.q_stride is not None and self.windowed:  # over each window's leading chunk
                b, nw, n, c = shortcut.shape
                pool = self.q_stride[0] * self.q_stride[1]
                shortcut = shortcut.reshape(b, nw, pool, n // pool, c).max(axis=2)
            elif self.q_stride is not None:
                shortcut = max_pool(shortcut, self.q_stride)
        if not self.windowed:  # the map: padded to whole windows (zeros after norm1), unrolled
            h, w = x.shape[1:3]
            window = (self.window, self.window) if self.window else (h, w)  # global: the map
            grid = (_pad_to(h, window[0]), _pad_to(w, window[1]))
            x = jnp.pad(x, ((0, 0), (0, grid[0] - h), (0, grid[1] - w), (0, 0)))
            stride = self.q_stride or (1, 1)
            if window[0] % stride[0] or window[1] % stride[1]:  # floor pooling of the whole map
                layout, x = None, x[:, None]
            else:
                layout = (window, (self.q_stride,) if self.q_stride else ())
                x = unroll_windows(x, *layout)
        x = MultiScaleAttention(
            self.dim_out,
            self.heads,
            q_stride=self.q_stride,
            dtype=self.dtype,
            proj_rescale=self.init_rescale,
            attention_kernel=self.attention_kernel,
            name="attn",
        )(x)
        if not self.windowed:  # back to the map, the padding cropped
            h, w = shortcut.shape[1:3]
            if layout is None:
                x = x[:, 0]
            else:
                pooled = tuple(g // s for g, s in zip(grid, stride))
                x = roll_windows(x, pooled, *pooled_layout(layout, self.q_stride))[:, :h, :w]
        drop = DropPath(self.drop_path, name="drop_path")
        if self.init_values is not None:
            x = LayerScale(self.init_values, name="ls1")(x)
        x = shortcut + drop(x, train=train)

        norm2 = LayerNorm(self.norm_eps, self.dtype, name="norm2")
        hidden = int(self.dim_out * self.mlp_ratio)
        mlp = Mlp(hidden, dtype=self.dtype, fc2_rescale=self.init_rescale, name="mlp")
        if self.init_values is None and not self.is_initializing():
            # norm2, the MLP and the residual in one (TPU) kernel, as Hiera's blocks run them
            # (hiera_jax.models.kernels.fused_mlp), on the map's tokens [B, H·W, C] (any order).
            tokens = x.reshape(x.shape[0], -1, x.shape[-1])
            keep, keep_scale = drop.draw(tokens.shape, train=train)
            params = self.variables["params"]
            fc1, fc2 = params["mlp"]["fc1"], params["mlp"]["fc2"]
            dense = (fc1["kernel"], fc1["bias"], fc2["kernel"], fc2["bias"])
            half = fused_mlp.MlpHalf(
                params["norm2"]["scale"],
                params["norm2"]["bias"],
                *(a.astype(self.dtype) for a in dense),
            )
            with jax.named_scope("mlp_half"):  # op_name for benchmarks/hbm_traffic.py
                out = fused_mlp.mlp_half(
                    tokens, half, self.norm_eps, keep, keep_scale, kernel=self.mlp_kernel
                )
            return out.reshape(x.shape)
        y = mlp(norm2(x))
        if self.init_values is not None:
            y = LayerScale(self.init_values, name="ls2")(y)
        return x + drop(y, train=train)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm `Mlp`; SAM 2 names the layers `layers.0` / `layers.1`)."""

    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    fc2_rescale: float = 1.0

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        w1, b1 = DenseParams(self.hidden_dim, name="fc1", **_dense_init())(dim)
        w2, b2 = DenseParams(dim, name="fc2", **_dense_init(self.fc2_rescale))(self.hidden_dim)
        w1, b1, w2, b2 = (p.astype(self.dtype) for p in (w1, b1, w2, b2))
        return fused_mlp.xla_mlp(x.astype(self.dtype), w1, b1, w2, b2, "gelu")


class HieraDet(nn.Module):
    """SAM 2's Hiera trunk on NHWC images: the last stage's map, or every stage's.

    `__call__(x)` -> [B, H/32, W/32, C_last] (for the default four stages); with
    `return_intermediates=True`, `(final, maps)` where `maps` holds the output of the last
    block of each stage ([B, H/4, W/4, C], ...), as SAM 2's trunk and timm's
    `forward_intermediates(output_fmt="NHWC")` return them.
    """

    config: HieraDetConfig

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, return_intermediates: bool = False, *, train: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
        x, maps = self.trunk(x, train=train)
        if return_intermediates:
            return x, maps
        return x

    def trunk(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
        """(last map, per-stage maps); the trunk's submodules, called from a compact method."""
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_chans:
            raise ValueError(
                f"HieraDet takes NHWC images [B, H, W, {cfg.in_chans}], got shape {x.shape}"
            )
        cfg.stage_grids(x.shape[1:3])  # a ValueError for a size the model cannot run
        grid = cfg.token_grid(x.shape[1:3])
        dtype = jnp.dtype(cfg.dtype)
        x = PatchEmbed(
            cfg.embed_dim,
            cfg.patch_kernel,
            cfg.patch_stride,
            cfg.patch_padding,
            dtype=dtype,
            name="patch_embed",
        )(x.astype(dtype))
        x = x.reshape(x.shape[0], *grid, cfg.embed_dim)  # PatchEmbed flattens: back to a map
        table_init = nn.initializers.normal(INIT_STD)  # timm: trunc_normal(0.02)
        side = cfg.window_spec[0]
        background = self.param("pos_embed", table_init, (1, *cfg.global_pos_size, cfg.embed_dim))
        window = self.param("pos_embed_window", table_init, (1, side, side, cfg.embed_dim))
        x = x + pos_embed(background, window, grid).astype(dtype)

        # remat: the block's activations are recomputed in the backward pass (`train` static).
        block_cls = nn.remat(MultiScaleBlock, static_argnums=(2,)) if cfg.remat else MultiScaleBlock
        # Runs of blocks in the same windows keep x as their tokens (`block_layouts`).
        maps, layout = [], None
        for i, (spec, want) in enumerate(
            zip(cfg.block_specs, block_layouts(cfg.block_specs, grid))
        ):
            x = relayout(x, grid, layout, want)
            x = block_cls(
                spec.dim_out,
                spec.heads,
                window=spec.window,
                q_stride=spec.q_stride,
                mlp_ratio=cfg.mlp_ratio,
                drop_path=spec.drop_path,
                init_values=cfg.init_values,
                norm_eps=cfg.layer_norm_eps,
                dtype=dtype,
                init_rescale=1.0 / math.sqrt(2.0 * (i + 1)),
                attention_kernel=cfg.attention_kernel,
                mlp_kernel=cfg.mlp_kernel,
                windowed=want is not None,
                name=f"blocks_{i}",
            )(x, train)
            layout = pooled_layout(want, spec.q_stride)
            if spec.q_stride is not None:  # floor pooling
                grid = tuple(g // s for g, s in zip(grid, spec.q_stride))
            if i in cfg.stage_ends:
                maps.append(relayout(x, grid, layout, None))
        return relayout(x, grid, layout, None), tuple(maps)


class ClassifierHead(nn.Module):
    """timm's `ClNormMlpClassifierHead` as `hieradet_sam2` builds it: mean over the map, LayerNorm,
    linear (`head.norm`, `head.fc`)."""

    num_classes: int
    norm_eps: float = 1e-6
    init_scale: float = 0.001
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        pooled = LayerNorm(self.norm_eps, self.dtype, name="norm")(x.mean(axis=(1, 2)))
        return Dense(self.num_classes, dtype=self.dtype, name="fc", **_dense_init(self.init_scale))(
            pooled
        )


class HieraDetForImageClassification(HieraDet):
    """The trunk with timm's classifier head: [B, H, W, C] images -> [B, num_classes] logits
    (float32, no softmax), as `timm.create_model("sam2_hiera_*", num_classes=N)`. Parameters are
    the trunk's plus `head/norm` and `head/fc`, so a SAM 2 trunk or an abs-win Hiera MAE encoder
    starts it (`train.py`'s `init_from`)."""

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, *, train: bool = False, return_features: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, dict[str, Any]]:
        cfg = self.config
        final, maps = self.trunk(x, train=train)
        logits = ClassifierHead(
            cfg.num_classes,
            cfg.layer_norm_eps,
            cfg.head_init_scale,
            jnp.dtype(cfg.dtype),
            name="head",
        )(final).astype(jnp.float32)
        if return_features:
            return logits, {"feature_maps": maps}
        return logits
