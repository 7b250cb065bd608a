"""What follows from a Hiera config's fields: token grids, per-block widths, heads, pooling
and windows (by the official or transformers' rule), runs of identical blocks, unroll and reroll
schedules, and the MAE's shapes. Plain Python, computed once, so the modules see static shapes.

`HieraGeometry` is a base of `HieraConfig`; it reads the config's fields and has none.
"""

from __future__ import annotations

import dataclasses
import math

Shape = tuple[int, ...]
BLOCK_RULES = ("official", "transformers")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one encoder block, as the constructor loop computes it."""

    dim: int
    dim_out: int
    heads: int
    q_stride: int  # flattened q-pool stride (4 for 2x2), 1 = no pooling
    window_size: int  # flattened mask-unit size after pooling
    use_mask_unit_attn: bool
    drop_path: float


class HieraGeometry:
    """The derived shapes of a `HieraConfig` (module docstring)."""

    @property
    def decoder_width(self) -> int:
        """The MAE decoder's width: `decoder_embed_dim`, else the official 512."""
        return 512 if self.decoder_embed_dim is None else self.decoder_embed_dim

    @property
    def decoder_blocks(self) -> int:
        return 8 if self.decoder_depth is None else self.decoder_depth

    @property
    def decoder_heads(self) -> int:
        return 16 if self.decoder_num_heads is None else self.decoder_num_heads

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
        """Per-block widths, heads, pooling and windows, by this config's `block_rule`."""
        return self._block_specs(self.block_rule)

    def _block_specs(self, rule: str) -> tuple[BlockSpec, ...]:
        flat_mu_size = math.prod(self.mask_unit_size)
        flat_q_stride = math.prod(self.q_stride)
        stage_ends = self.stage_ends
        q_pool_blocks = {end + 1 for end in stage_ends[: self.q_pool]}
        depth = self.depth
        # Linear from 0 to drop_path_rate over the blocks (the torch.linspace rule of both).
        rates = [self.drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        widths = [self.embed_dim]
        for stage in range(1, len(self.stages)):
            if rule == "official":  # int(embed_dim * dim_mul) at each transition
                widths.append(int(widths[-1] * self.dim_mul))
            else:  # transformers: int(embed_dim * embed_dim_multiplier ** stage)
                widths.append(int(self.embed_dim * self.dim_mul**stage))
        specs, stage, dim, pooled_mu = [], 0, self.embed_dim, flat_mu_size
        for i in range(depth):
            first = i - 1 in stage_ends  # the first block of a stage after the first
            if first:
                stage += 1
            if rule == "official":
                # The official loop reads the attention switch before moving to the next stage.
                use_mask_unit_attn = self.mask_unit_attn[stage - 1 if first else stage]
                if i in q_pool_blocks:
                    pooled_mu //= flat_q_stride
                window = pooled_mu
            else:
                previous = self.mask_unit_attn[max(stage - 1, 0)]
                use_mask_unit_attn = self.mask_unit_attn[stage] or ((first or i == 0) and previous)
                window = int(flat_mu_size * flat_q_stride**-stage)
            specs.append(
                BlockSpec(
                    dim=dim,
                    dim_out=widths[stage],
                    heads=self.num_heads[stage],
                    q_stride=flat_q_stride if i in q_pool_blocks else 1,
                    window_size=window,
                    use_mask_unit_attn=use_mask_unit_attn,
                    drop_path=rates[i],
                )
            )
            dim = widths[stage]
        return tuple(specs)

    def _rules_agree(self) -> bool:
        """Whether the official and transformers rules build the same blocks for this config."""

        def shape(specs):  # an unused window size makes no difference
            return [
                dataclasses.replace(s, window_size=s.window_size if s.use_mask_unit_attn else 0)
                for s in specs
            ]

        return shape(self._block_specs("official")) == shape(self._block_specs("transformers"))

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
