"""Hiera as a feature-map backbone (transformers' `HieraBackbone`), channels-last.

The maps are `HieraModel`'s stage maps (`reshaped_hidden_states`: the unrolled tokens rerolled to
space), each chosen one through its own LayerNorm (`hidden_states_norms/<stage>`, eps 1e-5:
transformers builds them as `nn.LayerNorm(channels)`), for detection and segmentation heads.

transformers' own `HieraBackbone.forward` feeds the embeddings to the encoder without the unroll
that `HieraModel.forward` applies first, so its encoder pools and attends over the wrong tokens
and its maps are not Hiera's (on shared random weights they differ from `HieraModel`'s maps plus
the same norms by 0.7-1.5 relative, `../shared/HF_API.md`). This module computes Hiera's; its
parameters are transformers' (the converter reads and writes `hidden_states_norms.*`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from hiera_jax.models.hiera import HieraEncoder
from hiera_jax.models.layers import layer_norm
from hiera_jax.models.outputs import BackboneOutput

BACKBONE_NORM_EPS = 1e-5  # torch's LayerNorm default, which transformers' backbone norms keep


class StageNorms(nn.Module):
    """One LayerNorm per named map (`stem`, `stage1`, ...), initialised (layer_norm_init, std)."""

    names: tuple[str, ...]
    scale: float = 1.0
    bias: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: tuple[jnp.ndarray, ...]) -> tuple[jnp.ndarray, ...]:
        return tuple(
            layer_norm(
                name,
                False,
                self.dtype,
                eps=BACKBONE_NORM_EPS,
                bias=self.bias,
                scale=self.scale,
            )(fmap)
            for name, fmap in zip(self.names, maps)
        )


class HieraBackbone(HieraEncoder):
    """The chosen stages' maps ([B, (T), H, W, C], spatial order), each after its LayerNorm.

    The stages are the config's `out_features` / `out_indices` (`stem` = the embeddings on the
    first stage's grid; default: the last stage). `output_hidden_states=True` adds the encoder's
    `hidden_states` (unrolled tokens) and `output_attentions=True` the last block's attention of
    each stage, as transformers' backbone returns them.
    """

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        *,
        train: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> BackboneOutput:
        cfg = self.config
        _, _, states = self.encode_with_states(
            x,
            None,
            train=train,
            return_intermediates=False,
            output_hidden_states=True,
            output_attentions=output_attentions,
            sized_config=self.input_config(x, interpolate_pos_encoding),
        )
        reshaped = states["reshaped_hidden_states"]  # stem, stage1, ..., stageN
        norms = StageNorms(
            tuple(cfg.out_features),
            scale=cfg.layer_norm_init,
            bias=cfg.initializer_range,
            dtype=self.compute_dtype,
            name="hidden_states_norms",
        )
        maps = norms(tuple(reshaped[i] for i in cfg.out_indices))
        return BackboneOutput(
            feature_maps=maps,
            hidden_states=states["hidden_states"] if output_hidden_states else None,
            attentions=states.get("attentions"),
        )
