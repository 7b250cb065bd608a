"""Where a train step's HBM bytes go: each model part's traffic per image, from the TPU compiler.

Compiles a recipe's train step for a TPU topology with libtpu on this CPU (as `train.py --aot`
does; nothing runs), blocks unscanned so every block's bytes are in the program, and attributes
the optimized HLO's top-level instructions (fusions, copies, reshapes, dots, collectives) to the
model's parts by their `op_name` metadata (`hiera_jax.training.cost.hlo_cost` counts each one's
operand and result buffers at their padded TPU size). Forward and backward are told apart by
JAX's `jvp(...)` / `transpose(jvp(...))` name scopes; what has neither is the optimizer update,
the RNG and the step's bookkeeping.

    pip install -e ".[train,tpu]"
    python benchmarks/hbm_traffic.py --write                  # the table in BENCHMARKS.md
    python benchmarks/hbm_traffic.py --only in1k_finetune:base
    python benchmarks/hbm_traffic.py --write-only             # the table from saved rows

The parts' sum is this module's estimate; the table gives XLA's own total beside it (the two
agree to a few percent on unscanned steps; tests/training/test_hlo_cost.py checks the counting).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is compile-only; the host traces

from sections import write_section  # noqa: E402

from hiera_jax.training.cost import aot, hlo_cost  # noqa: E402

OUT = os.path.join(ROOT, "runs", "hbm_traffic")
SECTION = "hbm-traffic"  # of BENCHMARKS.md
# (recipe, per-device batch): the settings (16 per device finetuning, 64 for MAE).
ROWS = [
    ("in1k_finetune:base", 16),
    ("in1k_mae:base", 64),
    ("in1k_finetune:tiny", 16),
    ("in1k_mae:tiny", 64),
    ("in1k_finetune:large", 16),
    ("in1k_mae:large", 64),
]
PARTS = [
    "attention",  # the encoder's blocks
    "MLP",
    "norms",
    "residual adds",
    "drop path",
    "stage-change proj + pool",
    "patch embed",
    "unroll, reroll, pos embed, masking",
    "MAE decoder: attention",
    "MAE decoder: MLP, norms, adds",
    "MAE decoder: embed, norm, pred",
    "heads + loss",
    "optimizer update",
    "RNG and bookkeeping",
]
# "mlp_half": the TPU kernel of norm2, the MLP and its residual (hiera_jax.models.kernels.fused_mlp).
BLOCK_PART = {
    "attn": "attention",
    "mlp": "MLP",
    "mlp_half": "MLP",
    "norm1": "norms",
    "norm2": "norms",
}
BLOCK_PART.update({"DropPath_0": "drop path", "proj": "stage-change proj + pool"})


def part_of(op_name: str) -> tuple[str, str, int | None]:
    """(model part, forward | backward | "", encoder block index or None) of one instruction."""
    direction = (
        "backward" if "transpose(jvp(" in op_name else "forward" if "jvp(" in op_name else ""
    )
    decoder = re.search(r"/decoder_blocks_\d+/([\w.]+)", op_name)
    if decoder:
        sub = "attention" if decoder.group(1) == "attn" else "MLP, norms, adds"
        return f"MAE decoder: {sub}", direction, None
    if re.search(r"/(decoder_embed|decoder_norm|decoder_pred|mask_token)", op_name):
        return "MAE decoder: embed, norm, pred", direction, None
    block = re.search(r"/blocks_(\d+)/([\w.]+)", op_name)
    if block:
        return BLOCK_PART.get(block.group(2), "residual adds"), direction, int(block.group(1))
    if "/patch_embed" in op_name:
        return "patch embed", direction, None
    if re.search(r"/(head|norm|encoder_norm|multi_scale_fusion_heads_\d+)/", op_name) or re.search(
        r"log_softmax|softmax_cross_entropy|/loss|jvp\(\)", op_name
    ):
        return "heads + loss", direction, None
    if direction:
        # Encoder-level reshapes and transposes (unroll, reroll), the position embedding add,
        # the mask-unit gather and the loss's target patches.
        return "unroll, reroll, pos embed, masking", direction, None
    if "threefry" in op_name or "random" in op_name or not op_name:
        return "RNG and bookkeeping", "", None
    return "optimizer update", "", None


def load_config(recipe: str, per_device: int, devices: int):
    name, _, arg = recipe.partition(":")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.batch_size = per_device * devices
    # Data parallel over the 2x2 (the large recipes' FSDP axis of 8 does not divide 4 chips,
    # and the question here is the model's traffic, not the collectives').
    config.mesh_shape = (-1, 1)
    config.model.scan_blocks = False  # every block's bytes in the program (no loop body)
    return config


def measure(recipe: str, per_device: int, topology: str, effort: float) -> dict:
    devices = len(aot.topology_devices(topology))
    config = load_config(recipe, per_device, devices)
    seen: dict = {}
    t0 = time.time()
    report = aot.fit_check(
        config,
        topology,
        effort=effort,
        config_name=recipe,
        on_compiled=lambda c: seen.update(text=c.as_text()),
    )
    stages = [int(s) for s in _stages(config)]
    stage_of = [i for i, depth in enumerate(stages) for _ in range(depth)]
    parts: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.Counter())
    attention_by_stage: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    for a in hlo_cost.accesses(seen["text"]):
        part, direction, block = part_of(a.op_name)
        nbytes = a.bytes * a.times
        parts[part][direction or "other"] += nbytes
        kinds[a.kind] += nbytes
        if part == "attention" and block is not None and block < len(stage_of):
            attention_by_stage[stage_of[block] + 1] += nbytes
    fl, roof = report["flops"], report.get("roofline", {})
    return {
        "recipe": recipe,
        "topology": topology,
        "per_device_batch": per_device,
        "remat": report["remat"],
        "effort": effort,
        "seconds": time.time() - t0,
        "date": time.strftime("%Y-%m-%d"),
        "xla_bytes_per_device": fl["xla_bytes_accessed_per_device"],
        "model_flops_per_example": fl["model_per_example"],
        "mfu_ceiling": roof.get("mfu_ceiling"),
        "bound_by": roof.get("bound_by"),
        "parts": {k: dict(v) for k, v in parts.items()},
        "attention_by_stage": dict(attention_by_stage),
        "kinds": dict(kinds),
    }


def _stages(config) -> list[int]:
    from hiera_jax.training.config import resolve_model_config

    return list(resolve_model_config(config).stages)


def _mb(x: float, per: int) -> str:
    mb = x / per / 1e6
    return f"{mb:.0f}" if mb >= 10 or mb == 0 else f"{mb:.2g}"


def report(r: dict) -> str:
    """One row's full figures (printed as each row is measured; the JSON keeps them too)."""
    per = r["per_device_batch"]
    total = sum(sum(v.values()) for v in r["parts"].values())
    lines = [
        f"{r['recipe']}, {per} per device on {r['topology']}: XLA counts "
        f"{r['xla_bytes_per_device'] / per / 1e9:.3g} GB per image, these parts "
        f"{total / per / 1e9:.3g}",
    ]
    for part in PARTS:
        v = r["parts"].get(part)
        if v:
            lines.append(
                f"  {part}: forward {_mb(v.get('forward', 0.0), per)}, backward "
                f"{_mb(v.get('backward', 0.0), per)}, other {_mb(v.get('other', 0.0), per)} MB"
            )
    kinds = sorted(r["kinds"].items(), key=lambda kv: -kv[1])[:6]
    lines.append("  by instruction: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in kinds))
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    """The rows side by side: one column per recipe, one line per model part."""
    if not results:
        return ""
    first = results[0]
    head = (
        f"Made by `python benchmarks/hbm_traffic.py --write`: the train step compiled with libtpu "
        f"for {first['topology']} (effort {first['effort']:g}) on this repository's CPU machine, "
        f"measured {', '.join(sorted({r.get('date', 'undated') for r in results}))}; blocks unscanned, "
        "data parallel; XLA's total, then this script's split of it by model part in MB per "
        "image, forward / backward (the optimizer and RNG have one figure). `--json` keeps "
        "the split by instruction kind."
    )
    cols = [
        f"{r['recipe'].removeprefix('in1k_')}, {r['per_device_batch']}/chip"
        + (", remat" if r.get("remat") else "")
        for r in results
    ]
    lines = [head, "", "| | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(results)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row(
        "**XLA: GB / image**",
        [f"**{r['xla_bytes_per_device'] / r['per_device_batch'] / 1e9:.3g}**" for r in results],
    )
    row("GFLOP / image", [f"{r['model_flops_per_example'] / 1e9:.3g}" for r in results])
    row(
        "MFU ceiling",
        ["?" if r["mfu_ceiling"] is None else f"{100 * r['mfu_ceiling']:.0f}%" for r in results],
    )
    for part in PARTS:
        if not any(r["parts"].get(part) for r in results):
            continue
        cells = []
        for r in results:
            v, per = r["parts"].get(part), r["per_device_batch"]
            if not v:
                cells.append("-")
            elif not (v.get("forward") or v.get("backward")):  # the optimizer, the RNG
                cells.append(_mb(sum(v.values()), per))
            else:
                cells.append(
                    f"{_mb(v.get('forward', 0.0), per)} / {_mb(v.get('backward', 0.0), per)}"
                )
        row(part, cells)
    row(
        "attention by stage",
        [
            ", ".join(
                _mb(v, r["per_device_batch"])
                for _, v in sorted(r["attention_by_stage"].items(), key=lambda x: int(x[0]))
            )
            for r in results
        ],
    )
    return "\n".join(lines)


def write(results: list[dict]) -> None:
    write_section(SECTION, table(results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipes to measure (default: all rows)")
    parser.add_argument(
        "--recipe",
        help="measure this recipe instead of the rows (e.g. digits_mae), see --per-device",
    )
    parser.add_argument("--per-device", type=int, default=16, help="with --recipe")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--effort", type=float, default=-1.0)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--reuse", action="store_true", help="keep rows measured before")
    parser.add_argument(
        "--write-only", action="store_true", help="write the table from the rows measured before"
    )
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    rows = [r for r in ROWS if not args.only or r[0] in args.only]
    if args.recipe:
        rows = [(args.recipe, args.per_device)]
    results, missing = [], []
    for recipe, per_device in rows:
        path = os.path.join(
            OUT, f"{recipe.replace(':', '_')}_{args.topology.replace(':', '_')}.json"
        )
        if (args.reuse or args.write_only) and os.path.exists(path):
            results.append(json.load(open(path)))
            continue
        if args.write_only:
            missing.append(f"{recipe} ({os.path.relpath(path, ROOT)})")
            continue
        result = measure(recipe, per_device, args.topology, args.effort)
        json.dump(result, open(path, "w"), indent=1)
        results.append(result)
        print(report(result), flush=True)
    if missing:  # writing without them would drop their rows from the table
        raise SystemExit(
            "--write-only: no saved measurement for " + ", ".join(missing) + "; measure them "
            "first (the same command without --write-only, or --reuse --write)"
        )
    if args.json:
        json.dump({"results": results}, open(args.json, "w"), indent=1)
    if args.write or args.write_only:
        write(results)


if __name__ == "__main__":
    main()
