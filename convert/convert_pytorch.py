"""Convert a PyTorch Hiera checkpoint into a hiera-jax model directory.

    python convert/convert_pytorch.py --model hiera_base_224 --input hiera_base_224.pth --output ckpt/
    python convert/convert_pytorch.py --model hiera_tiny_224 --input hf-dir/ --output ckpt/

`--input` is an official `.pth` (`{"model_state": ...}`), a timm `.pth`/`.safetensors`, or a Hugging
Face directory (`config.json` + `model.safetensors` or `pytorch_model.bin`). None needs torch:
pickled files are read by a restricted unpickler that refuses anything but tensors
(`hiera_jax.weights.torch_pickle`). The output loads with
`model, params = hiera_jax.load_pretrained("ckpt/")`. `--in-chans 1` (or 4...) adapts the RGB patch
embedding to another channel count, as timm's `adapt_input_conv` does.

Published checkpoints need no command: `hiera_jax.load_pretrained("hiera_base_224")` (or a Hugging
Face repo id, a timm name, an official URL) downloads and converts them once (`hiera_jax.weights.hub`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import hiera_jax  # noqa: E402
from hiera_jax.models.factory import MODEL_TYPES, model_type_for
from hiera_jax.weights.adapt import adapt_in_chans  # noqa: E402
from hiera_jax.weights.convert import SOURCES, detect_source  # noqa: E402
from hiera_jax.weights.formats import check_hf_config, read_state_dict  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"official variant name, one of: {', '.join(hiera_jax.list_models())}",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="checkpoint file (.pth/.pt/.bin/.safetensors) or Hugging Face directory",
    )
    parser.add_argument(
        "--output", required=True, help="directory to write config.json and params/ into"
    )
    parser.add_argument(
        "--source", default="auto", choices=("auto", *SOURCES), help="key layout of the checkpoint"
    )
    parser.add_argument(
        "--model-type",
        default=None,
        choices=MODEL_TYPES,
        help="target module (default: pretraining for mae_*, classification otherwise; backbone = HieraModel)",
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


def convert(args: argparse.Namespace) -> str:
    config = hiera_jax.get_config(args.model)
    state_dict, hf_config = read_state_dict(args.input)
    state_dict = hiera_jax.weights.convert.unwrap_state_dict(state_dict)
    source = detect_source(state_dict.keys()) if args.source == "auto" else args.source
    if hf_config is not None:
        check_hf_config(hf_config, config)
    model_type = model_type_for(args.model, args.model_type)
    params = hiera_jax.convert_state_dict(state_dict, config, source=source, model_type=model_type)
    if args.in_chans is not None:
        params, config = adapt_in_chans(params, config, args.in_chans, model_type)
    out = hiera_jax.save_pretrained(
        args.output, params, config, model_type=model_type, name=args.model
    )
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"converted {len(state_dict)} tensors ({source} format, {count:,} parameters) into {model_type} model {args.model}: {out}"
    )
    return out


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
