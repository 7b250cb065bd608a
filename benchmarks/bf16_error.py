"""bfloat16 inference against float32: relative error of logits and features.

    python benchmarks/bf16_error.py [--models hiera_tiny_224,hiera_base_224] [--batch 4]

Weights: the official PyTorch model's random initialisation (LayerNorm affine and head also
randomised, so no parameter sits at a trivial value), converted with `convert_state_dict`; the
same float32 parameters feed both runs, only `dtype` differs. Inputs are N(0, 1) images, which
is what ImageNet-normalised pixels look like to the model. Relative error = max|bf16 - f32| /
max|f32|, as in the parity tests.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch

import hiera_jax
from hiera_jax.models.hiera import HieraModel


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def official_params(name: str):
    import hiera

    torch.manual_seed(0)
    model = getattr(hiera, name)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        model.head.projection.weight.normal_(0.0, 0.05)
    return hiera_jax.convert_state_dict(model.state_dict(), name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="hiera_tiny_224,hiera_base_224")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    x = np.random.RandomState(0).randn(args.batch, 224, 224, 3).astype(np.float32)
    print(
        "| model | logits rel err | probs max abs err | top-1 agreement | stage maps rel err (1..4) |"
    )
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        params = official_params(name)
        out = {}
        for dtype in ("float32", "bfloat16"):
            model = hiera_jax.create_model(name, dtype=dtype)
            logits = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))(params, x)
            backbone = HieraModel(model.config)
            maps = jax.jit(
                lambda p, x, m=backbone: m.apply({"params": p}, x, return_intermediates=True)
            )({k: v for k, v in params.items() if k != "head"}, x).feature_maps
            out[dtype] = (np.asarray(logits, np.float32), [np.asarray(m, np.float32) for m in maps])
        (l32, m32), (l16, m16) = out["float32"], out["bfloat16"]
        p32, p16 = jax.nn.softmax(l32), jax.nn.softmax(l16)
        agree = float(np.mean(l32.argmax(-1) == l16.argmax(-1)))
        maps_err = " / ".join(f"{rel(a, b):.1e}" for a, b in zip(m16, m32))
        print(
            f"| {name} | {rel(l16, l32):.2e} | {float(np.abs(p16 - p32).max()):.1e} | "
            f"{agree:.0%} | {maps_err} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
