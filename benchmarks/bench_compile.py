"""Compile time, generated code and step time of the train step with `scan_blocks` off and on.

CPU rows (default, a few minutes on 2 cores): the finetune step of hiera_base_224 and the MAE
step of mae_hiera_base_224 (the in1k recipes at batch 8, float32, one CPU device), built as
`train.py` builds them (`setup.build_setup` + `jit_train_step`), each compiled in a fresh
process: trace + lower time, `compile()` time, the size of the compiled HLO text (XLA CPU reports
no generated code size) and temporaries; then the median step time, both steps compiled in one
process and run alternately so that other load on the machine slows both alike.

The machine's 1-minute load average when a row started is in the last column: compile times on
a shared 2-core machine move by tens of percent with it; code and memory sizes do not.

TPU rows (`--tpu`, ahead of time with libtpu on this CPU, nothing runs): the in1k MAE base step
through `train.py --aot v5e:2x2` (batch 64, bfloat16, the recipe) and the hiera_base_224
bfloat16 forward at batch 256 on the same slice, at the compiler efforts of `--tpu-efforts`.

    python benchmarks/bench_compile.py                      # CPU rows
    python benchmarks/bench_compile.py --tpu                # and the TPU rows (tens of minutes)
    python benchmarks/bench_compile.py --tpu --no-cpu --tpu-rows forward --tpu-efforts 0
    python benchmarks/bench_compile.py --tpu --no-cpu --tpu-rows parts   # loss, grads, step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CPU_ROWS = {
    "finetune": ("in1k_finetune", "hiera_base_224"),
    "mae": ("in1k_mae", "mae_hiera_base_224"),
}


# ---------------------------------------------------------------------- CPU train step
def cpu_setup(task: str, scan: bool, batch: int, dtype: str):
    """The in1k recipe's TrainSetup for `task` at base size on one CPU device."""
    import importlib

    import jax

    from hiera_jax.training import sharding
    from hiera_jax.training.setup import build_setup

    recipe, _ = CPU_ROWS[task]
    config = importlib.import_module(f"configs.{recipe}").get_config("base")
    config.batch_size = batch
    config.eval_batch_size = batch
    config.total_steps = 1000
    config.mesh_shape = (1, 1)
    config.model.dtype = dtype
    config.model.scan_blocks = scan
    mesh = sharding.create_mesh(config.mesh_shape, jax.devices()[:1])
    return build_setup(config, mesh, batch * 1000)


def cpu_row(task: str, scan: bool, batch: int, dtype: str) -> dict:
    """Trace, lower and compile one step, in this process (run it in a fresh one: `--_row`)."""
    import jax

    setup = cpu_setup(task, scan, batch, dtype)
    load = os.getloadavg()[0]
    with jax.set_mesh(setup.mesh):
        args = setup.abstract_train_args(jax.random.key(0))
        t0 = time.perf_counter()
        lowered = setup.jit_train_step().lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    return {
        "platform": "cpu",
        "step": f"{task} train step",
        "model": CPU_ROWS[task][1],
        "batch": batch,
        "dtype": dtype,
        "scan_blocks": scan,
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "generated_code_bytes": int(mem.generated_code_size_in_bytes) or None,  # 0 on CPU
        "hlo_text_chars": len(compiled.as_text()),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "load_average": load,
    }


def cpu_step_times(task: str, batch: int, steps: int, dtype: str) -> dict:
    """Median step seconds with the scan off and on, the two steps alternating (fair under load)."""
    import jax
    import numpy as np

    runs = {}
    for scan in (False, True):
        setup = cpu_setup(task, scan, batch, dtype)
        key = jax.random.key(0)
        with jax.set_mesh(setup.mesh):
            args = setup.abstract_train_args(key)
            compiled = setup.jit_train_step().lower(*args).compile()
            state = jax.jit(setup.init_state, out_shardings=setup.state_sh)(key)
        rng = np.random.default_rng(0)
        data = {"image": rng.standard_normal(args[1]["image"].shape, np.float32)}
        if "label" in args[1]:
            data["label"] = np.eye(setup.model_config.num_classes, dtype=np.float32)[
                np.arange(batch) % 10
            ]
        data = {k: jax.device_put(v, setup.batch_sh) for k, v in data.items()}
        runs[scan] = [compiled, state, data, key, []]
    for i in range(steps + 1):  # round 0 is a warm-up
        for run in runs.values():
            compiled, state, data, key, times = run
            t0 = time.perf_counter()
            run[1], metrics = compiled(state, data, key)
            jax.block_until_ready((run[1], metrics))
            if i:
                times.append(time.perf_counter() - t0)
    return {str(scan): statistics.median(run[4]) for scan, run in runs.items()}


def in_subprocess(
    kind: str, scan: bool, options: list[str], env: dict | None = None, quiet: bool = False
) -> dict:
    """One row measured in a fresh process (no jit cache or memory carried between rows)."""
    command = [sys.executable, os.path.abspath(__file__), "--_row", kind, str(int(scan)), *options]
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if run.returncode:
        raise RuntimeError(f"{kind} scan={scan} failed:\n{run.stderr[-3000:]}")
    row = json.loads(run.stdout.strip().splitlines()[-1])
    if not quiet:
        print(_row_line(row), file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------- TPU, ahead of time
def tpu_train_row(scan: bool, effort: float, topology: str, batch: int) -> dict:
    """`train.py --config configs/in1k_mae.py:base --aot TOPOLOGY`, its report as a row."""
    workdir = tempfile.mkdtemp(prefix=f"aot_scan_{'on' if scan else 'off'}_")
    command = [sys.executable, "train.py", "--config", "configs/in1k_mae.py:base"]
    command += ["--workdir", workdir, "--aot", topology, f"--aot_effort={effort}"]
    command += [f"--config.batch_size={batch}", f"--config.model.scan_blocks={scan}"]
    load = os.getloadavg()[0]
    t0 = time.time()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    path = os.path.join(workdir, f"aot_{topology}.json")
    if not os.path.exists(path):
        raise RuntimeError(f"train.py --aot failed:\n{run.stderr[-3000:]}")
    report = json.load(open(path))
    mem = report.get("memory") or {}
    return {
        "platform": f"tpu {topology} (AOT)",
        "step": "mae train step",
        "model": "mae_hiera_base_224",
        "batch": batch,
        "dtype": report.get("dtype"),
        "scan_blocks": scan,
        "effort": effort,
        "compile_s": report.get("compile_seconds"),
        "process_s": wall,
        "generated_code_bytes": mem.get("generated_code"),
        "peak_bytes": mem.get("peak"),
        "temp_bytes": mem.get("temporaries"),
        "fits": report.get("fits"),
        "command": " ".join(command[1:]),
        "load_average": load,
    }


def tpu_parts_rows(scan: bool, effort: float, topology: str, batch: int) -> list[dict]:
    """Code size and compile time of the in1k MAE base step's parts: the loss (forward), loss and
    gradients, the whole train step, compiled for `topology` with the recipe's shardings."""
    import jax

    from configs import in1k_mae
    from hiera_jax.training import sharding
    from hiera_jax.training.cost import aot
    from hiera_jax.training.setup import build_setup

    load = os.getloadavg()[0]
    config = in1k_mae.get_config("base")
    config.batch_size = batch
    config.model.scan_blocks = scan
    mesh = sharding.create_mesh(config.mesh_shape, aot.topology_devices(topology))
    setup = build_setup(config, mesh, batch * 1000)
    rows = []
    with jax.set_mesh(mesh):
        state, data, key = setup.abstract_train_args()

        def loss(params, image, key):
            rngs = {"mask": key, "dropout": key}
            return setup.model.apply({"params": params}, image, train=True, rngs=rngs)[0]

        parts = [
            ("mae loss (forward)", jax.jit(loss), (state["params"], data["image"], key)),
            ("mae loss + grads", jax.jit(jax.grad(loss)), (state["params"], data["image"], key)),
            ("mae train step", setup.jit_train_step(), (state, data, key)),
        ]
        for name, fn, args in parts:
            t0 = time.time()
            compiled = fn.lower(*args).compile({"exec_time_optimization_effort": float(effort)})
            rows.append(
                {
                    "platform": f"tpu {topology} (AOT)",
                    "step": name,
                    "model": "mae_hiera_base_224",
                    "batch": batch,
                    "dtype": setup.model_config.dtype,
                    "scan_blocks": scan,
                    "effort": effort,
                    "compile_s": time.time() - t0,
                    "generated_code_bytes": int(
                        compiled.memory_analysis().generated_code_size_in_bytes
                    ),
                    "load_average": load,
                }
            )
    return rows


def tpu_forward_row(scan: bool, effort: float, topology: str, batch: int) -> dict:
    """hiera_base_224 bfloat16 forward, batch split over the slice, compiled ahead of time."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import hiera_jax
    from hiera_jax.models.factory import init_params
    from hiera_jax.training import sharding
    from hiera_jax.training.cost import aot

    load = os.getloadavg()[0]
    devices = aot.topology_devices(topology)
    mesh = sharding.create_mesh((-1, 1), devices)
    model = hiera_jax.create_model("hiera_base_224", dtype="bfloat16", scan_blocks=scan)
    params = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    repl, batch_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), params)
    x = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32, sharding=batch_sh)
    t0 = time.time()
    with jax.set_mesh(mesh):
        lowered = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, x)
        t1 = time.time()
        compiled = lowered.compile({"exec_time_optimization_effort": float(effort)})
    t2 = time.time()
    mem = compiled.memory_analysis()
    return {
        "platform": f"tpu {topology} (AOT)",
        "step": "forward",
        "model": "hiera_base_224",
        "batch": batch,
        "dtype": "bfloat16",
        "scan_blocks": scan,
        "effort": effort,
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        "peak_bytes": float(getattr(mem, "peak_memory_in_bytes", 0)),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "load_average": load,
    }


# ---------------------------------------------------------------------- table
def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def _s(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _row_line(r: dict) -> str:
    return (
        f"{r['platform']} {r['step']} scan={r['scan_blocks']}: compile {_s(r.get('compile_s'))} s, "
        f"code {_mb(r.get('generated_code_bytes'))} MB"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| platform | program | batch, dtype | effort | scan_blocks | trace + lower (s) | compile (s) | generated code (MB) | HLO text (M chars) | temp / peak (MB) | step (s) | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        hlo = r.get("hlo_text_chars")
        hlo = "-" if hlo is None else f"{hlo / 1e6:.2f}"
        step = "-" if r.get("step_s") is None else f"{r['step_s']:.3f}"
        temp = _mb(r.get("temp_bytes"))
        if r.get("peak_bytes"):
            temp += f" / {_mb(r['peak_bytes'])}"
        lines.append(
            f"| {r['platform']} | {r['model']} {r['step']} | {r['batch']}, {r['dtype']} | "
            f"{r.get('effort', 'default')} | {'on' if r['scan_blocks'] else 'off'} | "
            f"{_s(r.get('trace_lower_s'))} | {_s(r.get('compile_s'))} | "
            f"{_mb(r.get('generated_code_bytes'))} | {hlo} | {temp} | {step} | "
            f"{_s(r.get('load_average'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(CPU_ROWS), choices=list(CPU_ROWS))
    parser.add_argument("--batch", type=int, default=8, help="CPU rows' batch")
    parser.add_argument(
        "--steps", type=int, default=4, help="timed CPU steps per variant (0: no step times)"
    )
    parser.add_argument("--dtype", default="float32", help="CPU rows' compute dtype")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    parser.add_argument("--tpu", action="store_true", help="add the TPU rows (ahead of time)")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--tpu-rows", nargs="*", default=["train", "forward"])
    parser.add_argument("--tpu-efforts", nargs="*", type=float, default=[-1.0])
    parser.add_argument("--tpu-batch", type=int, default=64, help="the MAE train step's batch")
    parser.add_argument("--forward-batch", type=int, default=256)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--_row", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._row:
        kind, scan = args._row[0], bool(int(args._row[1]))
        if kind == "forward":
            row = tpu_forward_row(scan, args.tpu_efforts[0], args.topology, args.forward_batch)
        elif kind == "parts":
            row = tpu_parts_rows(scan, args.tpu_efforts[0], args.topology, args.tpu_batch)
        elif kind.startswith("speed:"):
            row = cpu_step_times(kind.split(":")[1], args.batch, args.steps, args.dtype)
        else:
            row = cpu_row(kind, scan, args.batch, args.dtype)
        print(json.dumps(row))
        return
    rows = []
    if not args.no_cpu:
        options = [f"--batch={args.batch}", f"--steps={args.steps}", f"--dtype={args.dtype}"]
        cpu = {"JAX_PLATFORMS": "cpu"}
        for task in args.tasks:
            pair = [in_subprocess(task, scan, options, cpu) for scan in (False, True)]
            if args.steps > 0:
                times = in_subprocess(f"speed:{task}", False, options, cpu, quiet=True)
                for row in pair:
                    row["step_s"] = times[str(row["scan_blocks"])]
                print(
                    f"cpu {task} step (s): off {times['False']:.3f}, on {times['True']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
            rows += pair
    if args.tpu:
        for effort in args.tpu_efforts:
            for scan in (False, True):
                if "train" in args.tpu_rows:
                    rows.append(tpu_train_row(scan, effort, args.topology, args.tpu_batch))
                    print(_row_line(rows[-1]), file=sys.stderr, flush=True)
                if "parts" in args.tpu_rows:
                    options = [f"--topology={args.topology}", f"--tpu-efforts={effort}"]
                    options += [f"--tpu-batch={args.tpu_batch}"]
                    parts = in_subprocess("parts", scan, options, quiet=True)
                    for row in parts:
                        print(_row_line(row), file=sys.stderr, flush=True)
                    rows += parts
                if "forward" in args.tpu_rows:
                    options = [f"--topology={args.topology}", f"--tpu-efforts={effort}"]
                    options += [f"--forward-batch={args.forward_batch}"]
                    rows.append(in_subprocess("forward", scan, options))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
