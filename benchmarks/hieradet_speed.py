"""CPU forward speed of SAM 2's image encoder: ours (JAX, jitted) against timm, transformers and
the `sam2` package, in one process, on the same random weights and input.

Every implementation runs the same model, loaded with the same weights (converted from the
PyTorch reference's state dict), float32, batch 1. The timed calls of the implementations are
interleaved round by round, so a load that comes and goes hits all of them alike; each row is
the median over the rounds after a warm-up call, and the ratio is the reference's time over
ours (above 1: ours is faster). torch runs with all cores' threads, XLA with its own pool.
A machine doing other work at the same time lowers every row; the ratios hold up better.

    python benchmarks/hieradet_speed.py                  # tiny at 1024, 5 rounds
    python benchmarks/hieradet_speed.py --variant sam2_hiera_base_plus --size 512
    python benchmarks/hieradet_speed.py --write          # also update BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sections import write_section  # noqa: E402

from hiera_jax.models import hieradet, hieradet_neck  # noqa: E402
from hiera_jax.weights import hieradet_convert, hieradet_hf_config  # noqa: E402

SECTION = "hieradet-speed"  # of BENCHMARKS.md


def _randomise(model):
    """Random weights in every parameter (the converter is checked on them in the tests)."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model.eval()


def references(variant: str, size: int) -> dict:
    """{name: (torch module, call, params of ours, our module)} for each reference installed."""
    import timm
    import transformers

    trunk = hieradet.get_config(variant, input_size=(size, size))
    out = {}
    model = _randomise(timm.create_model(variant, pretrained=False, num_classes=0))
    params = hieradet_convert.convert_state_dict(model.state_dict(), trunk)
    out["timm (trunk)"] = (
        model,
        lambda m, x: m.forward_intermediates(x, intermediates_only=True),
        params,
        lambda p, x: hieradet.HieraDet(trunk).apply({"params": p}, x, return_intermediates=True)[1],
    )
    neck = hieradet_neck.FpnNeckConfig()
    config = transformers.Sam2VisionConfig(**hieradet_hf_config.transformers_vision_config(trunk))
    model = _randomise(transformers.Sam2VisionModel(config))
    params = hieradet_convert.convert_image_encoder_state_dict(model.state_dict(), trunk, neck)
    encoder = hieradet_neck.ImageEncoder(trunk, neck)
    out["transformers (encoder)"] = (
        model,
        lambda m, x: m(x).fpn_hidden_states,
        params,
        lambda p, x: encoder.apply({"params": p}, x)["backbone_fpn"],
    )
    try:
        import sam2
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError:
        print("sam2 is not installed: no SAM 2 row", flush=True)
        return out
    yaml = {
        "sam2_hiera_tiny": "t",
        "sam2_hiera_small": "s",
        "sam2_hiera_base_plus": "b+",
        "sam2_hiera_large": "l",
    }[variant]
    path = os.path.join(
        os.path.dirname(sam2.__file__), "configs", "sam2.1", f"sam2.1_hiera_{yaml}.yaml"
    )
    model = _randomise(instantiate(OmegaConf.load(path).model.image_encoder))
    params = hieradet_convert.convert_image_encoder_state_dict(model.state_dict(), trunk, neck)
    out["sam2 (encoder)"] = (
        model,
        lambda m, x: m(x)["backbone_fpn"],
        params,
        lambda p, x: encoder.apply({"params": p}, x)["backbone_fpn"],
    )
    return out


def measure(variant: str, size: int, rounds: int) -> list[dict]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    x = jax.device_put(x)
    rows = []
    for name, (model, call, params, ours) in references(variant, size).items():
        fn = jax.jit(ours)
        with torch.no_grad():
            want = [t.permute(0, 2, 3, 1).numpy() for t in call(model, xt)]
        got = [np.asarray(a) for a in jax.block_until_ready(fn(params, x))]  # compile + warm-up
        err = max(np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want))
        times: dict[str, list[float]] = {"ours": [], "ref": []}
        for _ in range(rounds):
            t = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            times["ours"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                call(model, xt)
            times["ref"].append(time.perf_counter() - t)
        ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["ref"])
        rows.append({"ref": name, "ours": ours_s, "torch": ref_s, "err": float(err)})
        print(
            f"{name}: ours {ours_s * 1e3:.0f} ms, reference {ref_s * 1e3:.0f} ms, "
            f"ratio {ref_s / ours_s:.2f}x, rel err {err:.1e}",
            flush=True,
        )
    return rows


def table(variant: str, size: int, rounds: int) -> str:
    lines = [
        "| reference (what is timed) | ours (JAX) ms | reference (PyTorch) ms | reference / ours "
        "| max rel err |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in measure(variant, size, rounds):
        lines.append(
            f"| {r['ref']} | {r['ours'] * 1e3:.0f} | {r['torch'] * 1e3:.0f} "
            f"| {r['torch'] / r['ours']:.2f}x | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sam2_hiera_tiny", choices=sorted(hieradet.VARIANTS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    body = table(args.variant, args.size, args.rounds)
    print(body)
    if args.write:
        flags = f" --variant {args.variant} --size {args.size} --rounds {args.rounds}"
        note = (
            f"Made by `python benchmarks/hieradet_speed.py --write{flags}`: "
            f"{args.variant} at {args.size}x{args.size}, batch 1, float32, forward only, "
            f"{os.cpu_count()} CPU cores; medians of {args.rounds} interleaved rounds.\n\n"
        )
        write_section(SECTION, note + body)


if __name__ == "__main__":
    main()
