"""transformers' vocabulary for a Hiera config: the names `transformers.HieraConfig` uses for our
(official) fields, the keys of its `config.json` that describe the file rather than the model,
and the properties that read a config under transformers' names (`depths`, `num_labels`,
`id2label`, `stage_names`, `out_features`, ...).

`TransformersNames` is a base of `HieraConfig`; it reads the config's fields and has none.
"""

from __future__ import annotations

from typing import Any

# transformers' HieraConfig name -> the canonical (official) field it sets.
HF_ALIASES: dict[str, str] = {
    "image_size": "input_size",
    "num_channels": "in_chans",
    "depths": "stages",
    "num_query_pool": "q_pool",
    "query_stride": "q_stride",
    "masked_unit_size": "mask_unit_size",
    "masked_unit_attention": "mask_unit_attn",
    "embed_dim_multiplier": "dim_mul",
    "patch_size": "patch_kernel",
    "decoder_hidden_size": "decoder_embed_dim",
    "num_labels": "num_classes",
}
# Keys of transformers' config.json files that describe the file or PyTorch, not the model:
# accepted and ignored (`dtype` / `torch_dtype` there is the storage dtype of the weights).
HF_METADATA_KEYS = frozenset(
    {
        "transformers_version", "architectures", "model_type", "_name_or_path", "name_or_path",
        "dtype", "torch_dtype", "hidden_size", "stage_names", "_commit_hash", "use_bfloat16",
        "torchscript", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
        "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
        "cross_attention_hidden_size", "tie_encoder_decoder", "finetuning_task", "tokenizer_class",
        "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
        "decoder_start_token_id", "task_specific_params", "max_length", "min_length",
        "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
        "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "_attn_implementation_autoset", "_attn_implementation_internal", "auto_map",
        "per_layer_config", "tie_last_hidden_states",
        # What code that hands a model to transformers' backbone users sets on its config.
        "use_pretrained_backbone", "use_timm_backbone",
    }
)  # fmt: skip
# Of those, the ones that describe the file, PyTorch or a derived value: read and dropped. The
# others (`architectures`, `finetuning_task`, token ids, `task_specific_params`, ...) are
# `PretrainedConfig`'s common attributes: kept when given, read back as attributes and written to
# config.json, as transformers keeps them.
HF_FILE_KEYS = frozenset(
    {
        "transformers_version", "model_type", "_name_or_path", "name_or_path", "dtype",
        "torch_dtype", "hidden_size", "stage_names", "_commit_hash",
        "_attn_implementation_autoset", "_attn_implementation_internal",
    }
)  # fmt: skip
HF_KEPT_ATTRIBUTES = HF_METADATA_KEYS - HF_FILE_KEYS
# The common attributes every transformers config has, with their defaults (5.23's to_dict).
HF_ATTRIBUTE_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
}
# transformers-only inputs that map onto canonical fields by a rule, not a rename.
HF_DERIVED_INPUTS = ("id2label", "label2id", "out_features", "out_indices")
# Official-constructor inputs expanded into canonical fields (per-stage heads).
OFFICIAL_INPUTS = ("head_mul",)
HF_EXTRAS_KEY = "hiera_jax"  # our fields transformers has no name for, inside config.json


class TransformersNames:
    """transformers' names of a `HieraConfig`'s fields, as properties (module docstring)."""

    @property
    def model_type(self) -> str:
        return "hiera"

    @property
    def image_size(self) -> list[int]:
        return list(self.input_size)

    @property
    def num_channels(self) -> int:
        return self.in_chans

    @property
    def depths(self) -> list[int]:
        return list(self.stages)

    @property
    def num_query_pool(self) -> int:
        return self.q_pool

    @property
    def query_stride(self) -> list[int]:
        return list(self.q_stride)

    @property
    def masked_unit_size(self) -> list[int]:
        return list(self.mask_unit_size)

    @property
    def masked_unit_attention(self) -> list[bool]:
        return list(self.mask_unit_attn)

    @property
    def embed_dim_multiplier(self) -> float:
        return self.dim_mul

    @property
    def patch_size(self) -> list[int]:
        return list(self.patch_kernel)

    @property
    def decoder_hidden_size(self) -> int:
        return self.decoder_embed_dim

    @property
    def num_labels(self) -> int:
        return self.num_classes

    @property
    def id2label(self) -> dict[int, str]:
        """Class index -> name: the names given, else transformers' `LABEL_{i}`."""
        names = self.class_names or tuple(f"LABEL_{i}" for i in range(self.num_classes))
        return dict(enumerate(names))

    @property
    def label2id(self) -> dict[str, Any]:
        """Name -> class index: as given (transformers keeps `{"label": "0"}`), else built."""
        given = self.__dict__.get("_hf_attributes", {}).get("label2id")
        return dict(given) if given is not None else {n: i for i, n in self.id2label.items()}

    @property
    def hidden_size(self) -> int:
        return self.num_features

    @property
    def stage_names(self) -> list[str]:
        """`stem` (the embeddings) then `stage1` ... `stageN`: the backbone's output names."""
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.stages) + 1)]

    @property
    def out_indices(self) -> list[int]:
        indices = self.out_stage_indices
        return list(indices) if indices is not None else [len(self.stages)]

    @property
    def out_features(self) -> list[str]:
        return [self.stage_names[i] for i in self.out_indices]

    def is_transformers_compatible(self) -> str | None:
        """None if transformers' HieraConfig describes this exact model, else why not."""
        if self.is_video:
            return "transformers has no video Hiera"
        if self.sep_pos_embed or self.abs_win_pos_embed:
            return "transformers' Hiera has one absolute position table (no sep/abswin tables)"
        if self.init_values is not None or not self.use_expand_proj:
            return "transformers' Hiera has no layer scale and always widens with a projection"
        if self.block_rule == "official" and not self._rules_agree():
            return (
                "transformers computes this config's attention windows differently (its "
                "block_rule is 'transformers'; this model follows the official code)"
            )
        return None
