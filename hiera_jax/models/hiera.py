"""Hiera backbone and classifier (Flax linen), channels-last.

Parameter trees are flat and named like the official state dict (`patch_embed`, `pos_embed`,
`blocks_{i}`, `norm`, `head`), so every model that shares the encoder shares its subtree names:
an MAE checkpoint's encoder drops straight into a classifier for finetuning.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp

from hiera_jax.models import masking, pos_embed
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.layers import HieraBlock, LayerNorm, PatchEmbed, head_init, layer_norm
from hiera_jax.models.matmul import Dense
from hiera_jax.models.scan import run_blocks, use_scan
from hiera_jax.models.unroll import reroll, unroll


@flax.struct.dataclass
class HieraModelOutput:
    """Backbone outputs.

    pooler_output: [B, C] mean of the last stage's tokens, layer-normed (None with a mask).
    last_hidden_state: [B, N, C] tokens of the last block (only kept tokens with a mask); in
        raster order when every unroll stride has been pooled (q_pool = len(stages) - 1, the
        classifiers), still unrolled otherwise (MAE encoders): use feature_maps[-1] for a map.
    feature_maps: per stage, [B, (T), H, W, C] in spatial order, or [B, #MUs_kept, *mu, C] with a
        mask; None unless requested.
    hidden_states: with `output_hidden_states=True`, as Hugging Face returns them: the embeddings
        (after the unroll and, with a mask, the selection of kept units) and the output of every
        stage, each [B, N, C] in the unrolled token order (len(stages) + 1 entries).
    reshaped_hidden_states: the same states rerolled as each stage sees them: [B, (T), H, W, C]
        in spatial order (embeddings at the first stage's grid), or [B, #MUs_kept, *mu, C] with a
        mask; the same maps as `feature_maps` for the stages.
    attentions: with `output_attentions=True`, the softmax probabilities of the last block of each
        stage, [B, heads, windows, n_q, n_k] (windows = 1 for global attention), as Hugging Face.
    """

    pooler_output: jnp.ndarray | None
    last_hidden_state: jnp.ndarray
    feature_maps: tuple[jnp.ndarray, ...] | None = None
    hidden_states: tuple[jnp.ndarray, ...] | None = None
    reshaped_hidden_states: tuple[jnp.ndarray, ...] | None = None
    attentions: tuple[jnp.ndarray, ...] | None = None


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
            f"{shape[1:-1]} (input shape {shape}, layout {layout}); build "
            f"the model with input_size={shape[1:-1]} to run at another size"
        )
    if shape[-1] != config.in_chans:
        raise ValueError(
            f"expected {config.in_chans} channels in the last axis ({layout}), got "
            f"{shape[-1]} (input shape {shape})"
        )


class HieraEncoder(nn.Module):
    """Shared trunk: patch embed, position embedding, unroll, blocks.

    Not a submodule of its own: subclasses call `encode` from their compact `__call__`, so the
    encoder's parameters sit at the top level of every model's tree, as in the official keys.
    """

    config: HieraConfig
    mae_init: bool = False  # official MAE models initialise with xavier/zero instead

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.config.dtype)

    def final_norm(self, name: str = "norm") -> LayerNorm:
        """The LayerNorm before the head (official (1, 0.02) init; (1, 0) for MAE and timm jax)."""
        zero_bias = self.mae_init or self.config.weight_init == "jax"
        return layer_norm(name, zero_bias, self.compute_dtype)

    def pos_embed(self) -> jnp.ndarray:
        cfg = self.config
        init = nn.initializers.normal(0.02)  # official trunc_normal_(std=0.02)
        dim = cfg.embed_dim
        if cfg.sep_pos_embed:
            frames, *spatial = cfg.tokens_spatial_shape
            num_spatial = spatial[0] * spatial[1]
            spatial_embed = self.param("pos_embed_spatial", init, (1, num_spatial, dim))
            temporal_embed = self.param("pos_embed_temporal", init, (1, frames, dim))
            # token index t·H·W + h·W + w: spatial tiled over T, temporal repeated H·W times.
            return jnp.tile(spatial_embed, (1, frames, 1)) + jnp.repeat(
                temporal_embed, num_spatial, axis=1
            )
        if cfg.abs_win_pos_embed:
            # timm abswin: NHWC tables; the global one is resized to the token grid at every
            # call (constant matrices), so the same parameters serve any input size.
            global_table = self.param("pos_embed", init, (1, *cfg.global_pos_size, dim))
            window_table = self.param("pos_embed_win", init, (1, *cfg.mask_unit_size, dim))
            return pos_embed.abswin_pos_embed(
                global_table, window_table, cfg.tokens_spatial_shape, xp=jnp
            )
        return self.param("pos_embed", init, (1, cfg.num_tokens, dim))

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
    ) -> tuple[jnp.ndarray, list[jnp.ndarray], dict[str, tuple[jnp.ndarray, ...]]]:
        """`encode`, plus the Hugging Face style states that were asked for.

        The dict holds `hidden_states` and `reshaped_hidden_states` (with `output_hidden_states`)
        and `attentions` (with `output_attentions`); see `HieraModelOutput`.
        """
        cfg = self.config
        masked = mask is not None
        check_input(cfg, x)
        keep = cfg.num_kept_mask_units
        pixel_mask = None
        if masked:
            cfg.check_masking_supported()
            masking.check_mask(mask, x.shape[0], cfg.num_mask_units, keep)
            mask = mask.astype(bool)
            pixel_mask = masking.mask_to_pixels(mask, cfg.mask_spatial_shape, cfg.input_size)
        dtype = self.compute_dtype
        x = PatchEmbed(
            cfg.embed_dim,
            cfg.patch_kernel,
            cfg.patch_stride,
            cfg.patch_padding,
            mae_init=self.mae_init,
            dtype=dtype,
            weight_init=cfg.weight_init,
            name="patch_embed",
        )(x.astype(dtype), pixel_mask)
        x = x + self.pos_embed().astype(x.dtype)
        x = unroll(x, cfg.tokens_spatial_shape, cfg.unroll_schedule)
        if masked:
            x = masking.select_kept_tokens(x, mask, keep)
            # A traced mask with the wrong keep count cannot raise: poison the output instead.
            x = x * masking.count_guard(mask, keep).astype(x.dtype)

        def rerolled(tokens: jnp.ndarray, stage: int) -> jnp.ndarray:
            schedule, size = cfg.reroll_plan(stage)
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
                name=f"blocks_{i}",
            )

        # Runs of identical blocks go through one scan (hiera_jax.models.scan); init always runs them
        # one by one, so each block draws its parameters under its own name.
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


class HieraModel(HieraEncoder):
    """Hiera backbone: pooled features, last hidden state and (on request) per-stage maps.

    `output_hidden_states=True` / `output_attentions=True` add the Hugging Face `HieraModel`
    outputs of the same names (see `HieraModelOutput`); both default off, and then the outputs and
    the compiled computation are those without them.
    """

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None = None,
        *,
        train: bool = False,
        return_intermediates: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> HieraModelOutput:
        tokens, maps, states = self.encode_with_states(
            x,
            mask,
            train=train,
            return_intermediates=return_intermediates,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        pooled = None
        if mask is None:
            pooled = self.final_norm()(tokens.mean(axis=1))
        return HieraModelOutput(
            pooler_output=pooled,
            last_hidden_state=tokens,
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
    ) -> jnp.ndarray | tuple[jnp.ndarray, dict[str, Any]]:
        cfg = self.config
        tokens, maps, states = self.encode_with_states(
            x,
            None,
            train=train,
            return_intermediates=return_features,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        pooled = self.final_norm()(tokens.mean(axis=1))
        pooled = nn.Dropout(cfg.head_dropout)(pooled, deterministic=not train)
        logits = Dense(
            cfg.num_classes,
            dtype=self.compute_dtype,
            name="head",
            **head_init(cfg.head_init_scale, cfg.weight_init),
        )(pooled)
        logits = logits.astype(jnp.float32)
        if return_features or output_hidden_states or output_attentions:
            extras: dict[str, Any] = dict(states)
            if return_features:
                extras.update(pooled=pooled, feature_maps=tuple(maps))
            return logits, extras
        return logits
