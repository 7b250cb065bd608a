"""`hiera-jax-convert`: a PyTorch Hiera checkpoint into a model directory (transformers' format).

    hiera-jax-convert --model hiera_base_224 --input hiera_base_224.pth --output ckpt/
    hiera-jax-convert --input hf-dir/ --output ckpt/

(`python -m hiera_jax.convert` and `python convert/convert_pytorch.py` run the same command.)

`--input` is an official `.pth` (`{"model_state": ...}`), a timm `.pth`/`.safetensors`, or a Hugging
Face directory (`config.json` + `model.safetensors` or `pytorch_model.bin`). None needs torch:
pickled files are read by a restricted unpickler that refuses anything but tensors
(`hiera_jax.weights.torch_pickle`). A Hugging Face directory's config.json decides the
architecture (`--model`, if given, must describe the same one); for the other formats `--model`
names the variant, or it is read from the tensor shapes. The output is `config.json` +
`model.safetensors` that both `hiera_jax.load_pretrained("ckpt/")` and transformers load
(`model_official.safetensors` for models transformers has no form for). `--in-chans 1` (or 4...)
adapts the RGB patch embedding to another channel count, as timm's `adapt_input_conv` does.

Published checkpoints need no command: `hiera_jax.load_pretrained("hiera_base_224")` (or a Hugging
Face repo id, a timm name, an official URL) downloads and converts them once
(`hiera_jax.weights.hub`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import jax

import hiera_jax
from hiera_jax.models.config import HieraConfig
from hiera_jax.models.factory import MODEL_TYPES, model_type_for
from hiera_jax.weights import formats, hub
from hiera_jax.weights.adapt import adapt_in_chans
from hiera_jax.weights.convert import SOURCES, detect_source, unwrap_state_dict
from hiera_jax.weights.directory import PREPROCESSOR_FILE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hiera-jax-convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        help="official variant name (default: the input's config.json, else read from the "
        f"tensor shapes), one of: {', '.join(hiera_jax.list_models(include_timm=True))}",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="checkpoint file (.pth/.pt/.bin/.safetensors) or Hugging Face directory",
    )
    parser.add_argument(
        "--output", required=True, help="directory to write config.json and model.safetensors into"
    )
    parser.add_argument(
        "--source", default="auto", choices=("auto", *SOURCES), help="key layout of the checkpoint"
    )
    parser.add_argument(
        "--model-type",
        default=None,
        choices=MODEL_TYPES,
        help="target model (default: what the checkpoint holds; for --model, pretraining for "
        "mae_* and classification otherwise); backbone = HieraModel, feature_backbone = "
        "HieraBackbone",
    )
    parser.add_argument(
        "--in-chans",
        type=int,
        default=None,
        metavar="N",
        help="adapt the patch embedding to N input channels as timm's adapt_input_conv does "
        "(1: sum over RGB; N > 3: RGB repeated and scaled by 3/N); not for MAE models",
    )
    return parser.parse_args(argv)


def target_config(
    args: argparse.Namespace, state_dict, file_config, named: HieraConfig | None
) -> tuple[HieraConfig, str]:
    """(config, model type): the input's Hiera config.json, `--model`, or the tensor shapes."""
    if isinstance(file_config, dict) and file_config.get("model_type") == "hiera":
        config = HieraConfig.from_dict(file_config)
        if named is not None and (wrong := formats.config_differences(config, named)):
            raise ValueError(
                f"{args.input}'s config.json does not describe {args.model}: " + "; ".join(wrong)
            )
        return config, args.model_type or formats.model_type_of_keys(state_dict)
    if named is not None:
        return named, model_type_for(args.model, args.model_type)
    name, model_type, overrides = hub.infer_variant(state_dict)
    return hiera_jax.get_config(name, **overrides), args.model_type or model_type


def convert(args: argparse.Namespace) -> str:
    named = hiera_jax.get_config(args.model) if args.model else None  # a bad name fails first
    state_dict, file_config = formats.read_state_dict(args.input)
    state_dict = unwrap_state_dict(state_dict)
    source = detect_source(state_dict.keys()) if args.source == "auto" else args.source
    config, model_type = target_config(args, state_dict, file_config, named)
    params = hiera_jax.convert_state_dict(state_dict, config, source=source, model_type=model_type)
    if args.in_chans is not None:
        params, config = adapt_in_chans(params, config, args.in_chans, model_type)
    out = hiera_jax.save_pretrained(args.output, params, config, model_type=model_type)
    kept = _keep_preprocessing(args.input, out, config.in_chans)
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    what = args.model or ("from config.json" if file_config else "read from the tensors")
    print(
        f"converted {len(state_dict)} tensors ({source} format, {count:,} parameters) into "
        f"{model_type} model ({what}): {out}{kept}"
    )
    return out


def _keep_preprocessing(source: str, out: str, channels: int) -> str:
    """Copy a model directory's preprocessor_config.json (its normalisation and sizes: what
    `predict` preprocesses with) when it fits the converted model's channels; the note to print."""
    path = os.path.join(source, PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        settings = json.load(f)
    mean = settings.get("image_mean") if isinstance(settings, dict) else None
    if isinstance(mean, list) and len(mean) != channels:
        return (
            f" (its {PREPROCESSOR_FILE} normalises {len(mean)} channels, the model takes "
            f"{channels}: not copied; the official preprocessing applies)"
        )
    shutil.copyfile(path, os.path.join(out, PREPROCESSOR_FILE))
    return f" (with its {PREPROCESSOR_FILE})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
