"""Hiera masked autoencoder (`HieraForPreTraining`), after the official `MaskedAutoencoderHiera`.

The encoder sees only the kept mask units; the stage outputs before each q-pool are fused into
the last stage's resolution; a light decoder fills the dropped units with a mask token and
predicts normalised pixels of every token. The loss covers the dropped tokens only.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from hiera_jax.models import masking, pos_embed
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.hiera import HieraEncoder, check_noise
from hiera_jax.models.kernels.matmul import Dense
from hiera_jax.models.layers import HieraBlock, dense_inits, fusion_head_init
from hiera_jax.models.scan import run_blocks, use_scan
from hiera_jax.models.unroll import undo_windowing


def pixel_labels(x: jnp.ndarray, config: HieraConfig) -> jnp.ndarray:
    """[B, (T), H, W, C] -> per-token targets [B, N_pred, pred_dim], in raster token order.

    Images flatten each patch as (C, py, px). Video keeps the official checkpoints' layout: the
    first frame of each tubelet only, flattened as (py, px, C) (the official code calls the
    difference "a mistake during training"; converted video checkpoints expect it).
    """
    p = config.pred_stride
    if config.is_video:
        x = x[:, :: config.patch_stride[0]]
        batch, frames, height, width, channels = x.shape
        x = x.reshape(batch, frames, height // p, p, width // p, p, channels)
        x = x.transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(batch, frames * (height // p) * (width // p), p * p * channels)
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(batch, (height // p) * (width // p), channels * p * p)


def normalize_targets(labels: jnp.ndarray) -> jnp.ndarray:
    """Per-token (l - mean) / sqrt(unbiased var + 1e-6), as official `forward_loss` (norm=True)."""
    mean = labels.mean(axis=-1, keepdims=True)
    var = labels.var(axis=-1, keepdims=True, ddof=1)
    return (labels - mean) / jnp.sqrt(var + 1.0e-6)


class _PatchifyConv(nn.Module):
    """`nn.Conv(features, kernel, strides=kernel, padding="VALID")` on [..., *spatial, C] as a matmul.

    Same parameters (`kernel` [*kernel, C_in, C_out], `bias`) and the same sums as the conv.
    """

    features: int
    kernel: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dims = len(self.kernel)
        lead, spatial, channels = x.shape[: -dims - 1], x.shape[-dims - 1 : -1], x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*self.kernel, channels, self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        out_spatial = tuple(s // k for s, k in zip(spatial, self.kernel))
        # [..., H/kh, kh, W/kw, kw, C] -> [..., H/kh, W/kw, kh, kw, C]
        x = x.reshape(*lead, *[d for pair in zip(out_spatial, self.kernel) for d in pair], channels)
        n = len(lead)
        perm = [*range(n), *range(n, n + 2 * dims, 2), *range(n + 1, n + 2 * dims, 2), x.ndim - 1]
        x = x.transpose(perm).reshape(*lead, *out_spatial, -1)
        w = kernel.reshape(-1, self.features).astype(self.dtype)
        return jnp.dot(x.astype(self.dtype), w) + bias.astype(self.dtype)


class HieraForPreTraining(HieraEncoder):
    """MAE pretraining model: `(loss, pred, label, mask)` as the official forward returns.

    pred and label hold the dropped tokens only, flattened over the batch: [B·N_masked, pred_dim].
    mask is the keep-mask [B, #MUs] (True = kept) that was used.

    The mask comes from `mask`, else from `noise` ([B, #MUs] floats: the lowest-noise units are
    kept, Hugging Face's rule, so the same noise gives HF's mask), else from the `mask` rng.
    `return_reconstruction`, `output_hidden_states` or `output_attentions` add a fifth element,
    a dict: `pred` (every token, [B, N_pred, pred_dim], HF's `logits`) and `visible` (True =
    visible, per prediction token, HF's `bool_masked_pos`) with return_reconstruction; the
    encoder's `hidden_states` / `reshaped_hidden_states` (over kept units) and `attentions` as HF
    `HieraForPreTraining` returns them with the other two (see `HieraModelOutput`).
    """

    mae_init: bool = True

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        mask: jnp.ndarray | None = None,
        *,
        noise: jnp.ndarray | None = None,
        train: bool = False,
        return_reconstruction: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ):
        cfg = self.config
        sized_config = self.input_config(x, interpolate_pos_encoding)  # shapes of this input's size
        dtype = self.compute_dtype
        keep = sized_config.num_kept_mask_units
        sized_config.check_masking_supported()
        if keep < 1:
            raise ValueError(
                f"mask_ratio={cfg.mask_ratio} keeps no mask unit out of "
                f"{sized_config.num_mask_units}"
            )
        if mask is not None and noise is not None:
            raise ValueError("pass either mask or noise to HieraForPreTraining, not both")
        if noise is None and mask is None:
            if not self.has_rng("mask"):
                raise ValueError(
                    "HieraForPreTraining needs a keep-mask: pass mask=..., noise=... or "
                    "rngs={'mask': key}"
                )
            noise = masking.random_noise(
                self.make_rng("mask"), x.shape[0], sized_config.num_mask_units
            )
        if noise is not None:
            noise = check_noise(noise, x.shape[0], sized_config)
            mask = masking.mask_from_noise(noise, keep)
            ids_restore = masking.ids_restore(noise)
        else:
            mask = jnp.asarray(mask)
            ids_restore = masking.ids_restore(~mask.astype(bool))

        # ---------------------------------------------------------------- encoder
        _, maps, states = self.encode_with_states(
            x,
            mask,
            train=train,
            return_intermediates=True,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            sized_config=sized_config,
        )
        # Resolution is constant after the last q-pool: fuse the stages before it and the last.
        maps = maps[: cfg.q_pool] + maps[-1:]
        mu_final = cfg.mask_unit_spatial_shape_final
        fused = 0.0
        for i, stage_map in enumerate(maps):
            if i < cfg.q_pool:
                stage_map = self.fusion_head(i, stage_map, mu_final)
            fused = fused + stage_map
        latent = self.layer_norm("encoder_norm", zero_bias=True)(fused)  # [B, K, *mu_final, C]

        # ---------------------------------------------------------------- decoder
        latent = Dense(cfg.decoder_width, dtype=dtype, name="decoder_embed", **dense_inits(True))(
            latent
        )
        mask_token = self.param(
            "mask_token",
            nn.initializers.normal(cfg.initializer_range),
            (1, 1, cfg.decoder_width),
        )
        tokens = masking.scatter_kept_units(latent, mask, mask_token.reshape(-1))
        grid_final = sized_config.tokens_spatial_shape_final
        tokens = undo_windowing(tokens, grid_final, mu_final)
        tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])  # raster order
        visible = jnp.broadcast_to(
            mask.reshape(mask.shape + (1,) * (len(mu_final) + 1)),
            mask.shape + tuple(mu_final) + (1,),
        )
        visible = undo_windowing(visible, grid_final, mu_final).reshape(mask.shape[0], -1)

        pos = self.param(
            "decoder_pos_embed",
            nn.initializers.normal(cfg.initializer_range),
            (1, math.prod(cfg.tokens_spatial_shape_final), cfg.decoder_width),
        )
        pos = pos_embed.resize_grid(pos, cfg.tokens_spatial_shape_final, grid_final, xp=jnp)
        tokens = tokens + pos.astype(tokens.dtype)
        block_args = dict(
            dim_out=cfg.decoder_width,
            heads=cfg.decoder_heads,
            mlp_ratio=cfg.mlp_ratio,
            mae_init=True,
            dtype=dtype,
            hidden_act=cfg.hidden_act,
            norm_eps=cfg.layer_norm_eps,
            init_std=cfg.initializer_range,
            norm_scale_init=cfg.layer_norm_init,
            attention_kernel=cfg.attention_kernel,
            mlp_kernel=cfg.mlp_kernel,
        )
        names = [f"decoder_blocks_{i}" for i in range(cfg.decoder_blocks)]
        if use_scan(cfg) and not self.is_initializing() and len(names) >= 2:
            # Every decoder block is the same block: one scan (init draws them one by one).
            blocks = [HieraBlock(**block_args, name=name, parent=None) for name in names]
            tokens = run_blocks(self, blocks, tokens, train=train, remat=cfg.remat)
        else:
            block_cls = nn.remat(HieraBlock, static_argnums=(2,)) if cfg.remat else HieraBlock
            for name in names:
                tokens = block_cls(**block_args, name=name)(tokens, train)
        tokens = self.layer_norm("decoder_norm", zero_bias=True)(tokens)
        pred_all = Dense(cfg.pred_dim, dtype=dtype, name="decoder_pred", **dense_inits(True))(
            tokens
        ).astype(jnp.float32)  # [B, N_pred, pred_dim]

        # ---------------------------------------------------------------- loss
        labels_all = pixel_labels(x.astype(jnp.float32), sized_config)
        if cfg.normalize_pixel_loss:
            labels_all = normalize_targets(labels_all)
        num_masked = visible.shape[1] - keep * math.prod(mu_final)
        masked_idx = masking.kept_indices(~visible, num_masked)  # raster order of dropped tokens
        pred = jnp.take_along_axis(pred_all, masked_idx[..., None], axis=1)
        label = jnp.take_along_axis(labels_all, masked_idx[..., None], axis=1)
        loss = jnp.mean((pred - label) ** 2)
        pred = pred.reshape(-1, cfg.pred_dim)
        label = label.reshape(-1, cfg.pred_dim)
        if return_reconstruction or output_hidden_states or output_attentions:
            extras = dict(states)
            if return_reconstruction:
                extras.update(pred=pred_all, visible=visible, ids_restore=ids_restore)
            return loss, pred, label, mask, extras
        return loss, pred, label, mask

    def fusion_head(self, index: int, stage_map: jnp.ndarray, mu_final) -> jnp.ndarray:
        """Strided conv taking [B, K, *mu, C] to the final mask-unit resolution [B, K, *mu_f, C'].

        kernel == stride and no padding, so the conv is a patchify reshape plus one matmul;
        written that way because XLA CPU runs this conv's gradient as a slow generic
        convolution (88 ms of a 900 ms tiny MAE step). Parameters are the `nn.Conv` ones.
        """
        spatial, channels = stage_map.shape[2:-1], stage_map.shape[-1]
        kernel = tuple(m // f for m, f in zip(spatial, mu_final))
        init = fusion_head_init(kernel, channels)
        features = self.config.num_features
        head = _PatchifyConv(
            features,
            kernel,
            dtype=self.compute_dtype,
            kernel_init=init["kernel_init"],
            bias_init=init["bias_init"],
            name=f"multi_scale_fusion_heads_{index}",
        )
        return head(stage_map)


def unpatchify(tokens: jnp.ndarray, config: HieraConfig) -> jnp.ndarray:
    """Inverse of `pixel_labels` for images: [B, N_pred, pred_dim] -> [B, H, W, C]."""
    if config.is_video:
        raise ValueError("unpatchify supports image models only")
    p = config.pred_stride
    gh, gw = config.tokens_spatial_shape_final
    batch = tokens.shape[0]
    x = tokens.reshape(batch, gh, gw, config.in_chans, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(batch, gh * p, gw * p, config.in_chans)
