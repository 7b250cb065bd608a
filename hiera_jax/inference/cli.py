"""Command line: top-5 class names for images (or clips), and per-stage features to `.npz`.

Installed as `hiera-jax-predict`; `python -m hiera_jax.predict` is the same command.

    python -m hiera_jax.predict --checkpoint checkpoints/hiera_tiny_224 cat.jpg dog.png
    python -m hiera_jax.predict --checkpoint DIR --features feats.npz cat.jpg
    python -m hiera_jax.predict --checkpoint hiera_tiny_224 cat.jpg  # published weights, by name
    python -m hiera_jax.predict --model hiera_tiny_224 cat.jpg      # random weights: demo only
    # A jax.export artifact of the model (runs with nothing but jax), then run through it:
    python -m hiera_jax.predict --checkpoint hiera_tiny_224 --export tiny.jaxexport
    python -m hiera_jax.predict --checkpoint tiny.jaxexport cat.jpg
    # SAM 2's image encoder (trunk + FPN neck) by name, its features over every local device:
    python -m hiera_jax.predict --checkpoint facebook/sam2.1-hiera-tiny --features f.npz \
        --input-size 1024 --shard cat.jpg

`--features` writes `stage1` ... `stageN` arrays [N_inputs, (T), H, W, C] (spatial order,
channels-last), `files` (the inputs, in order) and, for classifiers, `probs`; for SAM 2's
image encoder also `vision_features`, `backbone_fpn0..` and `vision_pos_enc0..` (NHWC, finest
first, as SAM 2's `ImageEncoder` returns them).
Video models (`*_16x224`) take `.npy` [T, H, W, C] arrays, folders of frames, animated GIFs or,
with PyAV installed, video files; a clip is 16 frames at temporal stride 4.

Errors (missing or unreadable inputs, a bad checkpoint, an unknown model, bad options) print one
line `error: ...` on stderr and exit with code 2; `--verbose` adds the traceback. `--top-k` above
the model's number of classes shows every class, with a note on stderr.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from hiera_jax import families

# The name in usage and error lines: the one the user typed.
PROG = (
    "hiera-jax-predict"
    if os.path.basename(sys.argv[0]) == "hiera-jax-predict"
    else "python -m hiera_jax.predict"
)
EXIT_ERROR = 2  # bad arguments, inputs or checkpoints (as argparse's usage errors)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit code 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {PROG} --help)")


def _fail(message: str) -> NoReturn:
    """Print `error: message` as one line on stderr and exit with code 2."""
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog=PROG,
        description="Hiera (JAX) predictions and feature maps for image or video files.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files (or clips)")
    parser.add_argument(
        "--checkpoint",
        help="model directory (converter / save_pretrained / train.py), or a pretrained name "
        "(hiera_tiny_224, facebook/hiera-tiny-224-in1k-hf, hiera_base_224.mae_in1k_ft_in1k, "
        "a .pth URL or file): downloaded and converted once into the cache",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="without --checkpoint: a RANDOMLY initialised variant, for a demo (e.g. "
        f"hiera_tiny_224); one of {', '.join(_model_names())}",
    )
    parser.add_argument(
        "--input-size",
        type=_positive_int,
        help="run at this square size (resamples pos embeds)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--top-k",
        type=_positive_int,
        default=5,
        help="classes shown per input (>= 1; more than the model has shows them all, with a note)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument(
        "--shard",
        action="store_true",
        help="split every batch over all local devices (a data-parallel mesh; params replicated)",
    )
    parser.add_argument(
        "--temporal-stride", type=_positive_int, default=4, help="video: frames between samples"
    )
    parser.add_argument("--features", metavar="OUT.npz", help="write per-stage feature maps here")
    parser.add_argument(
        "--export",
        metavar="FILE",
        help="write the model as a jax.export artifact (FILE, and FILE.json beside it) that "
        "runs with nothing but jax; --checkpoint FILE then runs it",
    )
    parser.add_argument(
        "--export-task",
        choices=("classify", "features"),
        help="what the artifact returns (default: class probabilities for a classifier, else "
        "the per-stage feature maps)",
    )
    parser.add_argument(
        "--export-platforms",
        default="cpu,cuda,tpu",
        help="comma-separated platforms the artifact is lowered for (default cpu,cuda,tpu)",
    )
    parser.add_argument("--seed", type=int, default=0, help="init seed of a random --model")
    parser.add_argument(
        "--verbose", action="store_true", help="print the traceback of an error as well"
    )
    args = parser.parse_args(argv)
    if args.model is not None and args.model not in _model_names():
        close = difflib.get_close_matches(args.model, _model_names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(
            f"unknown model name {args.model!r}{hint}; known models: {', '.join(_model_names())}"
        )
    if not args.checkpoint and not args.model:
        parser.error("give --checkpoint DIR, or --model NAME for a random-weight demo")
    if not args.inputs and not args.export:
        parser.error("give the input files (or --export FILE to write the model)")
    if args.export and (args.features or args.shard):
        parser.error("--export writes the model only; run it with --checkpoint FILE")
    return args


def _model_names() -> list[str]:
    """--model choices: the official variants and SAM 2's image encoders."""
    return families.all_variants()


def build_predictor(args: argparse.Namespace):
    """The Predictor for `--checkpoint` (or a random `--model`); OSError / ValueError if not."""
    import jax

    from hiera_jax import inference

    overrides = {"dtype": args.dtype}
    if getattr(args, "shard", False):
        overrides["devices"] = jax.local_devices()
    if args.checkpoint and _is_export(args.checkpoint):
        from hiera_jax.inference.artifact import meta_path

        if args.input_size or getattr(args, "shard", False) or args.dtype != "float32":
            raise ValueError(
                f"{args.checkpoint} is an exported model: its size, dtype and devices were fixed "
                "when it was written (--input-size, --dtype and --shard do not apply)"
            )
        if getattr(args, "export", None):
            raise ValueError(
                f"{args.checkpoint} is already an export ({meta_path(args.checkpoint)})"
            )
        return inference.Predictor.from_exported(args.checkpoint, batch_size=args.batch_size)
    if args.checkpoint:
        if args.input_size:
            overrides["input_size"] = args.input_size
        try:  # names, repos, URLs -> a directory (downloaded and converted once); SAM 2's too
            return inference.Predictor.from_pretrained(
                args.checkpoint, batch_size=args.batch_size, **overrides
            )
        except (OSError, ValueError) as err:
            msg = str(err)
            if args.checkpoint not in msg and os.path.abspath(args.checkpoint) not in msg:
                msg = f"{args.checkpoint}: {msg}"
            raise ValueError(f"cannot load checkpoint {args.checkpoint}: {msg}") from err
    if args.input_size:  # a new image size; a video model keeps its frames
        default = families.for_name(args.model).get_config(args.model).input_size
        overrides["input_size"] = (*default[:-2], args.input_size, args.input_size)
    try:
        return inference.Predictor.random(
            args.model, seed=args.seed, batch_size=args.batch_size, **overrides
        )
    except ValueError as err:
        raise ValueError(
            f"cannot build {args.model} at --input-size {args.input_size}: {err}"
        ) from err


def _is_export(path: str) -> bool:
    """A `jax.export` artifact written by `--export` (a file with its JSON beside it)."""
    from hiera_jax.inference.artifact import meta_path

    return os.path.isfile(path) and os.path.isfile(meta_path(path))


def export(args: argparse.Namespace) -> int:
    """`--export FILE`: the model of --checkpoint / --model as a jax.export artifact."""
    from hiera_jax.inference.artifact import meta_path
    from hiera_jax.inference.export import export_model

    predictor = build_predictor(args)
    if not args.checkpoint:
        _warn_random(args)
    platforms = [p.strip() for p in args.export_platforms.split(",") if p.strip()]
    path = export_model(predictor, path=args.export, platforms=platforms, task=args.export_task)
    size = os.path.getsize(path) / 1e6
    print(f"wrote {path} ({size:.1f} MB, for {', '.join(platforms)}) and {meta_path(path)}")
    return 0


def _warn_random(args: argparse.Namespace) -> None:
    print(
        "\n" + "!" * 78 + f"\nWARNING: no --checkpoint given: {args.model} has RANDOM weights "
        f"(seed {args.seed}).\nIts predictions and features are MEANINGLESS; use it only to try "
        "the pipeline.\n" + "!" * 78 + "\n",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    """The command for parsed `args`; OSError / ValueError for anything the user can fix."""
    from hiera_jax.models.backends import start_quietly

    start_quietly(args.verbose)  # a CPU-only machine: the GPU/TPU plugins' noise as one line
    if args.export:
        return export(args)
    missing = [path for path in args.inputs if not os.path.exists(path)]
    if missing:  # before loading a model
        raise FileNotFoundError(f"input file not found: {', '.join(missing)}")
    predictor = build_predictor(args)
    predictor.temporal_stride = args.temporal_stride
    batch = predictor.preprocess(args.inputs)
    if not args.checkpoint:
        _warn_random(args)
    outputs: dict[str, np.ndarray] = {}
    if predictor.has_head:
        probs = predictor.predict(batch, preprocessed=True)
        outputs["probs"] = probs
        k = min(args.top_k, probs.shape[-1])
        if k < args.top_k:
            print(
                f"note: --top-k {args.top_k} is more than the model's {k} classes; showing all {k}",
                file=sys.stderr,
            )
        for path, row in zip(args.inputs, probs):
            print(path)
            for rank, idx in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
                print(f"  {rank}. {row[idx]:.4f}  {predictor.names[idx]}  (class {idx})")
    elif not args.features:
        raise ValueError(
            f"{args.checkpoint} is a {predictor.model_type} checkpoint with no classifier "
            "head; use --features OUT.npz to extract feature maps"
        )
    if args.features:
        maps = predictor.features(batch, preprocessed=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.features)), exist_ok=True)
        np.savez(args.features, files=np.asarray(args.inputs), **maps, **outputs)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in maps.items())
        print(f"wrote {args.features}: {shapes}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI: 0 on success; errors print one line on stderr and exit with code 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError) as err:
        if args.verbose:
            traceback.print_exc()
        _fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
