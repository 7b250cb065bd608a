"""Command line: top-5 class names for images (or clips), and per-stage features to `.npz`.

    python -m hiera_jax.predict --checkpoint checkpoints/hiera_tiny_224 cat.jpg dog.png
    python -m hiera_jax.predict --checkpoint DIR --features feats.npz cat.jpg
    python -m hiera_jax.predict --model hiera_tiny_224 cat.jpg      # random weights: demo only

`--features` writes `stage1` ... `stageN` arrays [N_inputs, (T), H, W, C] (spatial order,
channels-last), `files` (the inputs, in order) and, for classifiers, `probs`.
Video models (`*_16x224`) take `.npy` [T, H, W, C] arrays, folders of frames, animated GIFs or,
with PyAV installed, video files; a clip is 16 frames at temporal stride 4.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from hiera_jax.config import list_models


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hiera_jax.predict",
        description="Hiera (JAX) predictions and feature maps for image or video files.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (or clips)")
    parser.add_argument(
        "--checkpoint", help="model directory (converter / save_pretrained / train.py)"
    )
    parser.add_argument(
        "--model",
        choices=list_models(),
        metavar="NAME",
        help="without --checkpoint: a RANDOMLY initialised variant, for a demo (e.g. hiera_tiny_224)",
    )
    parser.add_argument(
        "--input-size", type=int, help="run at this square size (resamples pos embeds)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--temporal-stride", type=int, default=4, help="video: frames between samples"
    )
    parser.add_argument("--features", metavar="OUT.npz", help="write per-stage feature maps here")
    parser.add_argument("--seed", type=int, default=0, help="init seed of a random --model")
    return parser.parse_args(argv)


def build_predictor(args: argparse.Namespace):
    from hiera_jax import inference

    overrides = {"dtype": args.dtype}
    if args.checkpoint:
        if args.input_size:
            overrides["input_size"] = args.input_size
        try:
            return inference.Predictor.from_pretrained(
                args.checkpoint, batch_size=args.batch_size, **overrides
            )
        except (OSError, ValueError) as err:
            msg = str(err)
            if args.checkpoint not in msg and os.path.abspath(args.checkpoint) not in msg:
                msg = f"{args.checkpoint}: {msg}"
            raise SystemExit(f"error: cannot load checkpoint {args.checkpoint}: {msg}") from err
    if not args.model:
        raise SystemExit("error: give --checkpoint DIR, or --model NAME for a random-weight demo")
    if args.input_size:
        dims = 3 if "16x" in args.model else 2
        overrides["input_size"] = (16,) * (dims - 2) + (args.input_size, args.input_size)
    print(
        "\n" + "!" * 78 + f"\nWARNING: no --checkpoint given: {args.model} has RANDOM weights "
        f"(seed {args.seed}).\nIts predictions and features are MEANINGLESS; use it only to try "
        "the pipeline.\n" + "!" * 78 + "\n",
        file=sys.stderr,
    )
    predictor = inference.Predictor.random(
        args.model, seed=args.seed, batch_size=args.batch_size, **overrides
    )
    return predictor


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    predictor = build_predictor(args)
    predictor.temporal_stride = args.temporal_stride
    try:
        batch = predictor.preprocess(args.inputs)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    outputs: dict[str, np.ndarray] = {}
    if predictor.has_head:
        probs = predictor.predict(batch, preprocessed=True)
        outputs["probs"] = probs
        k = min(args.top_k, probs.shape[-1])
        for path, row in zip(args.inputs, probs):
            print(path)
            for rank, idx in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
                print(f"  {rank}. {row[idx]:.4f}  {predictor.names[idx]}  (class {idx})")
    elif not args.features:
        raise SystemExit(
            f"error: {args.checkpoint} is a {predictor.model_type} checkpoint with no classifier "
            "head; use --features OUT.npz to extract feature maps"
        )
    if args.features:
        maps = predictor.features(batch, preprocessed=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.features)), exist_ok=True)
        np.savez(args.features, files=np.asarray(args.inputs), **maps, **outputs)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in maps.items())
        print(f"wrote {args.features}: {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
