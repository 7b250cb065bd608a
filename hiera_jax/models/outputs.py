"""Model outputs: pytrees with the fields, order and access of Hugging Face's `ModelOutput`.

The modules return them from `apply` (so they pass through `jax.jit`), and the Hugging Face-style
classes return them from a call. As in transformers, a field left as None is absent: `out[0]` is
the first field that is set, `out["logits"]` reads by name, `out.to_tuple()` gives the set fields
in order, and `keys()` / `items()` name them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax.numpy as jnp

Array = jnp.ndarray


class ModelOutput:
    """Mapping-style access for the output dataclasses below (transformers' `ModelOutput`)."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value for _, value in self.items())

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def values(self) -> list[Any]:
        return [value for _, value in self.items()]

    def items(self) -> list[tuple[str, Any]]:
        return [
            (field.name, getattr(self, field.name))
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        ]

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if isinstance(key, str) else None
        return default if value is None else value

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            value = getattr(self, key, None) if key in self._field_names() else None
            if value is None:
                raise KeyError(f"{type(self).__name__} has no {key!r} (fields set: {self.keys()})")
            return value
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.items())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    @classmethod
    def _field_names(cls) -> set[str]:
        return {field.name for field in dataclasses.fields(cls)}


@flax.struct.dataclass
class HieraModelOutput(ModelOutput):
    """`HieraModel` outputs, as transformers' `HieraModelOutput` (+ our `feature_maps`).

    last_hidden_state: [B, N, C] tokens of the last block (only kept tokens with a mask); in
        raster order when every unroll stride has been pooled (q_pool = len(stages) - 1, the
        classifiers), still unrolled otherwise (MAE encoders): use feature_maps[-1] for a map.
    pooler_output: [B, C] mean of the last tokens, layer-normed (over the kept tokens with a mask,
        as transformers); None without a pooling layer.
    bool_masked_pos: [B, #MUs] True = kept mask unit, when the input was masked.
    ids_restore: [B, #MUs] the unit order that undoes the noise's argsort (transformers' rule),
        when the input was masked.
    hidden_states: with `output_hidden_states=True`: the embeddings (after the unroll and, with a
        mask, the selection of kept units) and the output of every stage, each [B, N, C] in the
        unrolled token order (len(stages) + 1 entries).
    attentions: with `output_attentions=True`, the softmax probabilities of the last block of each
        stage, [B, heads, windows, n_q, n_k] (windows = 1 for global attention).
    reshaped_hidden_states: the hidden states rerolled as each stage sees them: [B, (T), H, W, C]
        in spatial order (embeddings at the first stage's grid), or [B, #MUs_kept, *mu, C] with a
        mask.
    feature_maps: per stage, the same maps as `reshaped_hidden_states[1:]`, with
        `return_intermediates=True` (None otherwise).
    """

    last_hidden_state: Array | None = None
    pooler_output: Array | None = None
    bool_masked_pos: Array | None = None
    ids_restore: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    reshaped_hidden_states: tuple[Array, ...] | None = None
    feature_maps: tuple[Array, ...] | None = None


@flax.struct.dataclass
class HieraForImageClassificationOutput(ModelOutput):
    """transformers' `HieraForImageClassificationOutput`: loss (with labels), logits, states."""

    loss: Array | None = None
    logits: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    reshaped_hidden_states: tuple[Array, ...] | None = None


@flax.struct.dataclass
class HieraForPreTrainingOutput(ModelOutput):
    """transformers' `HieraForPreTrainingOutput`.

    logits: [B, N_pred, pred_stride² · C] the decoder's pixels for every prediction token in
        raster order (masked or not), in the targets' (C, py, px) layout.
    bool_masked_pos: [B, N_pred] True = the token's mask unit was kept (visible).
    ids_restore: [B, #MUs] as in `HieraModelOutput`.
    """

    loss: Array | None = None
    logits: Array | None = None
    bool_masked_pos: Array | None = None
    ids_restore: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    reshaped_hidden_states: tuple[Array, ...] | None = None


@flax.struct.dataclass
class BackboneOutput(ModelOutput):
    """transformers' `BackboneOutput`: the chosen stages' normalised maps, and optional states.

    The module returns the maps channels-last ([B, H, W, C]); the Hugging Face-style
    `HieraBackbone` call returns them channels-first ([B, C, H, W]), as transformers does.
    """

    feature_maps: tuple[Array, ...] | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
