"""Hiera backbone and classifier (Flax linen), channels-last.

Parameter trees are flat and named like the official state dict (`patch_embed`, `pos_embed`,
`blocks_{i}`, `norm`, `head`), so every model that shares the encoder shares its subtree names:
an MAE checkpoint's encoder drops straight into a classifier for finetuning.

`interpolate_pos_encoding=True` runs a model at an input size other than its config's: the shapes
of that call are those of the config at the input's size, and the position tables (declared at the
config's size) are resampled to it inside the traced function, as transformers does per call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hiera_jax.models import masking, pos_embed
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.kernels.matmul import Dense
from hiera_jax.models.layers import HieraBlock, LayerNorm, PatchEmbed, head_init, layer_norm
from hiera_jax.models.outputs import HieraModelOutput
from hiera_jax.models.scan import run_blocks, use_scan
from hiera_jax.models.unroll import reroll, unroll


def check_input(config: HieraConfig, x: jnp.ndarray) -> None:
    """ValueError for an input of the wrong dtype, rank, layout, size or channels.

    Static checks only (dtype and shape), so they run once while tracing and cost nothing in jit.
    """
    expected = (*config.input_size, config.in_chans)
    layout = "[B, T, H, W, C]" if config.is_video else "[B, H, W, C]"
    shape = tuple(x.shape)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"the model takes normalised float input, got dtype {x.dtype} (input shape {shape}); "
            "preprocess images with hiera_jax.inference (preprocess_image or Predictor), or as "
            "(x / 255 - mean) / std in float32"
        )
    if x.ndim != len(expected) + 1:
        raise ValueError(
            f"expected input of rank {len(expected) + 1} {layout} (channels-last) with "
            f"{layout[4:-1]} = {expected}, got shape {shape}"
        )
    if shape[-1] != config.in_chans and shape[1] == config.in_chans:
        # Channels-first ([B, C, H, W] / [B, C, T, H, W], the PyTorch layout): say how to fix it.
        first = "[B, C, T, H, W]" if config.is_video else "[B, C, H, W]"
        perm = (0, *range(2, x.ndim), 1)
        moved = tuple(shape[i] for i in perm)
        size_note = ""
        if moved[1:-1] != tuple(config.input_size):
            size_note = (
                f"; the model also expects size {tuple(config.input_size)}, and this input is "
                f"{moved[1:-1]}"
            )
        raise ValueError(
            f"input shape {shape} looks channels-first {first}, but the models take "
            f"channels-last {layout}: transpose it with x.transpose{perm}{size_note}"
        )
    if shape[1:-1] != tuple(config.input_size):
        raise ValueError(
            f"expected input size {tuple(config.input_size)} for this model, got "
            f"{shape[1:-1]} (input shape {shape}, layout {layout}); pass "
            "interpolate_pos_encoding=True to run at another size (the position embeddings are "
            f"resampled), or build the model with input_size={shape[1:-1]}"
        )
    if shape[-1] != config.in_chans:
        raise ValueError(
            f"expected {config.in_chans} channels in the last axis ({layout}), got "
            f"{shape[-1]} (input shape {shape})"
        )


def input_config(
    config: HieraConfig, x: jnp.ndarray, interpolate_pos_encoding: bool
) -> HieraConfig:
    """The config whose shapes a call on channels-last `x` runs at: the model's, or (with
    `interpolate_pos_encoding`) the model's at `x`'s size. A bad input raises in `check_input`,
    with the model's own sizes."""
    size = tuple(x.shape[1:-1])
    rank_ok = x.ndim == len(config.input_size) + 2 and x.shape[-1] == config.in_chans
    if not interpolate_pos_encoding or not rank_ok or size == tuple(config.input_size):
        return config
    try:
        return config.replace(input_size=size)
    except ValueError as err:
        raise ValueError(
            f"cannot run this model (built for {tuple(config.input_size)}) at input size "
            f"{size}: {err}"
        ) from err


class HieraEncoder(nn.Module):
    """Shared trunk: patch embed, position embedding, unroll, blocks.

    Not a submodule of its own: subclasses call `encode` from their compact `__call__`, so the
    encoder's parameters sit at the top level of every model's tree, as in the official keys.
    """

    config: HieraConfig
    mae_init: bool = False  # official MAE models initialise with xavier/zero instead

    def __post_init__(self) -> None:
        # A sealed copy: changing the caller's config later cannot change this model.
        if isinstance(self.config, HieraConfig):
            object.__setattr__(self, "config", self.config.frozen())
        super().__post_init__()

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.config.dtype)

    def layer_norm(self, name: str, zero_bias: bool | None = None) -> LayerNorm:
        """A LayerNorm with the config's eps and init ((1, 0.02); (1, 0) for MAE and timm jax)."""
        cfg = self.config
        if zero_bias is None:
            zero_bias = self.mae_init or cfg.weight_init == "jax"
        return layer_norm(
            name,
            zero_bias,
            self.compute_dtype,
            eps=cfg.layer_norm_eps,
            bias=cfg.initializer_range,
            scale=cfg.layer_norm_init,
            kernel=cfg.mlp_kernel,
        )

    def final_norm(self, name: str = "norm") -> LayerNorm:
        """The LayerNorm before the head."""
        return self.layer_norm(name)

    def input_config(self, x: jnp.ndarray, interpolate_pos_encoding: bool) -> HieraConfig:
        """The config whose shapes this call runs at (`input_config`)."""
        return input_config(self.config, x, interpolate_pos_encoding)

    def pos_embed(self, sized_config: HieraConfig) -> jnp.ndarray:
        """The position embedding [1, N, C] for the token grid of `sized_config` (resampled if it
        differs)."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)  # official trunc_normal_(std=0.02)
        dim = cfg.embed_dim
        grid, sized_grid = cfg.tokens_spatial_shape, sized_config.tokens_spatial_shape
        if cfg.sep_pos_embed:
            frames, *spatial = grid
            spatial_embed = self.param("pos_embed_spatial", init, (1, spatial[0] * spatial[1], dim))
            temporal_embed = self.param("pos_embed_temporal", init, (1, frames, dim))
            spatial_embed = pos_embed.resize_grid(spatial_embed, grid[1:], sized_grid[1:], xp=jnp)
            temporal_embed = pos_embed.resize_grid(temporal_embed, grid[:1], sized_grid[:1], xp=jnp)
            frames, num_spatial = sized_grid[0], sized_grid[1] * sized_grid[2]
            # token index t·H·W + h·W + w: spatial tiled over T, temporal repeated H·W times.
            return jnp.tile(spatial_embed, (1, frames, 1)) + jnp.repeat(
                temporal_embed, num_spatial, axis=1
            )
        if cfg.abs_win_pos_embed:
            # timm abswin: NHWC tables; the global one is resized to the token grid at every
            # call (constant matrices), so the same parameters serve any input size.
            global_table = self.param("pos_embed", init, (1, *cfg.global_pos_size, dim))
            window_table = self.param("pos_embed_win", init, (1, *cfg.mask_unit_size, dim))
            return pos_embed.abswin_pos_embed(global_table, window_table, sized_grid, xp=jnp)
        table = self.param("pos_embed", init, (1, cfg.num_tokens, dim))
        return pos_embed.resize_grid(table, grid, sized_grid, xp=jnp)

    def encode(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None,
        *,
        train: bool,
        return_intermediates: bool,
    ) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """[B, (T), H, W, C] -> (last tokens [B, N, C], per-stage maps if requested)."""
        tokens, maps, _ = self.encode_with_states(
            x, mask, train=train, return_intermediates=return_intermediates
        )
        return tokens, maps

    def encode_with_states(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None,
        *,
        train: bool,
        return_intermediates: bool,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        sized_config: HieraConfig | None = None,
    ) -> tuple[jnp.ndarray, list[jnp.ndarray], dict[str, tuple[jnp.ndarray, ...]]]:
        """`encode`, plus the Hugging Face style states that were asked for.

        The dict holds `hidden_states` and `reshaped_hidden_states` (with `output_hidden_states`)
        and `attentions` (with `output_attentions`); see `HieraModelOutput`. `sized_config` is the
        config of this call's input size (`input_config`); None = the model's.
        """
        cfg = self.config
        sized_config = cfg if sized_config is None else sized_config
        masked = mask is not None
        check_input(sized_config, x)
        keep = sized_config.num_kept_mask_units
        pixel_mask = None
        if masked:
            sized_config.check_masking_supported()
            masking.check_mask(mask, x.shape[0], sized_config.num_mask_units, keep)
            mask = mask.astype(bool)
            pixel_mask = masking.mask_to_pixels(
                mask, sized_config.mask_spatial_shape, sized_config.input_size
            )
        dtype = self.compute_dtype
        x = PatchEmbed(
            cfg.embed_dim,
            cfg.patch_kernel,
            cfg.patch_stride,
            cfg.patch_padding,
            mae_init=self.mae_init,
            dtype=dtype,
            weight_init=cfg.weight_init,
            init_std=cfg.initializer_range,
            name="patch_embed",
        )(x.astype(dtype), pixel_mask)
        x = x + self.pos_embed(sized_config).astype(x.dtype)
        x = unroll(x, sized_config.tokens_spatial_shape, sized_config.unroll_schedule)
        if masked:
            x = masking.select_kept_tokens(x, mask, keep)
            # A traced mask with the wrong keep count cannot raise: poison the output instead.
            x = x * masking.count_guard(mask, keep).astype(x.dtype)

        def rerolled(tokens: jnp.ndarray, stage: int) -> jnp.ndarray:
            schedule, size = sized_config.reroll_plan(stage)
            return reroll(tokens, size, schedule, masked=masked)

        hidden, reshaped, attentions = [], [], []
        if output_hidden_states:
            hidden.append(x)
            reshaped.append(rerolled(x, 0))

        specs = cfg.block_specs

        def block_args(i: int) -> dict[str, Any]:
            spec = specs[i]
            return dict(
                dim_out=spec.dim_out,
                heads=spec.heads,
                mlp_ratio=cfg.mlp_ratio,
                drop_path=spec.drop_path,
                q_stride=spec.q_stride,
                window_size=spec.window_size,
                use_mask_unit_attn=spec.use_mask_unit_attn,
                mae_init=self.mae_init,
                dtype=dtype,
                init_values=cfg.init_values,
                use_expand_proj=cfg.use_expand_proj,
                weight_init=cfg.weight_init,
                # timm fix_init (with its jax init): attn.proj, mlp.fc2 / sqrt(2 · (i + 1)).
                init_rescale=(2.0 * (i + 1)) ** -0.5 if cfg.weight_init == "jax" else 1.0,
                hidden_act=cfg.hidden_act,
                norm_eps=cfg.layer_norm_eps,
                init_std=cfg.initializer_range,
                norm_scale_init=cfg.layer_norm_init,
                attention_kernel=cfg.attention_kernel,
                mlp_kernel=cfg.mlp_kernel,
                name=f"blocks_{i}",
            )

        # Runs of identical blocks go through one scan (hiera_jax.models.scan); init always runs
        # them one by one, so each block draws its parameters under its own name.
        scan = use_scan(cfg) and not self.is_initializing()
        block_cls = nn.remat(HieraBlock, static_argnums=(2, 3)) if cfg.remat else HieraBlock
        intermediates = []
        stage = 0
        for start, stop in cfg.block_runs:
            # Hugging Face reports the attention of the last block of each stage only: with
            # output_attentions that block runs on its own, after the scan.
            scan_stop = stop - 1 if output_attentions and stop - 1 in cfg.stage_ends else stop
            if scan and scan_stop - start >= 2:
                blocks = [HieraBlock(**block_args(i), parent=None) for i in range(start, scan_stop)]
                x = run_blocks(self, blocks, x, train=train, remat=cfg.remat)
                start = scan_stop
            for i in range(start, stop):
                want_attention = output_attentions and i in cfg.stage_ends
                out = block_cls(**block_args(i))(x, train, want_attention)
                if want_attention:
                    x, probs = out
                    attentions.append(probs)
                else:
                    x = out
            if stop - 1 in cfg.stage_ends:
                stage_map = None
                if return_intermediates or output_hidden_states:
                    stage_map = rerolled(x, stage)
                if return_intermediates:
                    intermediates.append(stage_map)
                if output_hidden_states:
                    hidden.append(x)
                    reshaped.append(stage_map)
                stage += 1
        states = {}
        if output_hidden_states:
            states["hidden_states"] = tuple(hidden)
            states["reshaped_hidden_states"] = tuple(reshaped)
        if output_attentions:
            states["attentions"] = tuple(attentions)
        return x, intermediates, states


def check_noise(noise: jnp.ndarray, batch: int, sized_config: HieraConfig) -> jnp.ndarray:
    """Hugging Face's `noise` [B, #MUs] (floats; the lowest-noise units are kept), checked."""
    noise = jnp.asarray(noise)
    expected = (batch, sized_config.num_mask_units)
    if tuple(noise.shape) != expected:
        raise ValueError(
            f"noise must have shape [batch, num_mask_units] = {expected}, got {tuple(noise.shape)}"
        )
    if not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(f"noise must be floats (uniform in [0, 1)), got dtype {noise.dtype}")
    return noise


class HieraModel(HieraEncoder):
    """Hiera backbone: pooled features, last hidden state and (on request) per-stage maps.

    `output_hidden_states=True` / `output_attentions=True` add the Hugging Face `HieraModel`
    outputs of the same names (see `HieraModelOutput`); both default off, and then the outputs and
    the compiled computation are those without them. A `mask` ([B, #MUs], True = kept) or
    Hugging Face's `noise` ([B, #MUs]: the lowest-noise units are kept) runs the encoder on the
    kept mask units only, as transformers' `HieraModel(..., is_mae=True)`.
    """

    add_pooling_layer: bool = True  # transformers' HieraModel(add_pooling_layer=...): `norm`

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None = None,
        *,
        noise: jnp.ndarray | None = None,
        train: bool = False,
        return_intermediates: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> HieraModelOutput:
        sized_config = self.input_config(x, interpolate_pos_encoding)
        ids_restore = None
        if noise is not None:
            if mask is not None:
                raise ValueError("pass either mask or noise, not both")
            noise = check_noise(noise, x.shape[0], sized_config)
            mask = masking.mask_from_noise(noise, sized_config.num_kept_mask_units)
            ids_restore = masking.ids_restore(noise)
        tokens, maps, states = self.encode_with_states(
            x,
            mask,
            train=train,
            return_intermediates=return_intermediates,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            sized_config=sized_config,
        )
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
            if ids_restore is None:
                ids_restore = masking.ids_restore(~mask)  # kept units first, in index order
        pooled = None
        if self.add_pooling_layer:  # over the kept tokens when masked, as transformers pools
            pooled = self.final_norm()(tokens.mean(axis=1))
        return HieraModelOutput(
            last_hidden_state=tokens,
            pooler_output=pooled,
            bool_masked_pos=mask,
            ids_restore=ids_restore,
            feature_maps=tuple(maps) if return_intermediates else None,
            **states,
        )


class HieraForImageClassification(HieraEncoder):
    """Backbone + mean pool + LayerNorm + dropout + linear head; returns logits (no softmax).

    With `return_features`, `output_hidden_states` or `output_attentions` it returns
    `(logits, extras)`: `extras` holds `pooled` and `feature_maps` (return_features),
    `hidden_states` and `reshaped_hidden_states` (output_hidden_states) and `attentions`
    (output_attentions), the last three as Hugging Face `HieraForImageClassification` returns
    them (see `HieraModelOutput`).
    """

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        *,
        train: bool = False,
        return_features: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> jnp.ndarray | tuple[jnp.ndarray, dict[str, Any]]:
        cfg = self.config
        tokens, maps, states = self.encode_with_states(
            x,
            None,
            train=train,
            return_intermediates=return_features,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            sized_config=self.input_config(x, interpolate_pos_encoding),
        )
        pooled = self.final_norm()(tokens.mean(axis=1))
        pooled = nn.Dropout(cfg.head_dropout)(pooled, deterministic=not train)
        logits = Dense(
            cfg.num_classes,
            dtype=self.compute_dtype,
            name="head",
            **head_init(cfg.head_init_scale, cfg.weight_init, cfg.initializer_range),
        )(pooled)
        logits = logits.astype(jnp.float32)
        if return_features or output_hidden_states or output_attentions:
            extras: dict[str, Any] = dict(states)
            if return_features:
                extras.update(pooled=pooled, feature_maps=tuple(maps))
            return logits, extras
        return logits
