"""Speed and memory of hiera-jax against the official PyTorch Hiera (`hiera-transformer`).

    python benchmarks/bench_speed.py            # full table (tiny + base, batch 1 and 8, MAE)
    python benchmarks/bench_speed.py --quick    # a couple of minutes: tiny only, fewer repeats

For each case the JAX and PyTorch steps run in the same process, alternating A B A B, and the
median of the repeats (after warm-up) is reported as images/s with the ratio JAX / PyTorch.
Cases: inference forward, a classifier training step (forward, backward, AdamW) and the MAE
pretraining step (JAX with and without rematerialisation). GFLOP/s use the model FLOPs from XLA's
cost analysis of the JAX step (the same arithmetic for both frameworks) and are printed next to
the machine's matrix-multiply rate measured here. Peak memory: each training case also runs in a
fresh process per framework, which reports its peak RSS (`ru_maxrss`) and the rise over its RSS
after set-up; for JAX, `compiled.memory_analysis()` of the step is listed as well.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------- helpers
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not `ru_maxrss`: Linux keeps that across fork + exec,
    so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs(batch: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, 224, 224, 3).astype(np.float32)
    y = rng.randint(0, 1000, size=(batch,))
    return x, y


# ---------------------------------------------------------------------- JAX side
def jax_case(
    kind: str,
    name: str,
    batch: int,
    remat: bool = False,
    dtype: str = "float32",
    scan_blocks: bool | None = None,
    lower_only: bool = False,
):
    """(step() -> blocks until done, compiled) for one case; with `lower_only`, the Lowered
    (of shapes only: nothing is initialised)."""
    import jax
    import jax.numpy as jnp
    import optax

    import hiera_jax
    from hiera_jax.models.factory import init_params

    model = hiera_jax.create_model(name, remat=remat, dtype=dtype, scan_blocks=scan_blocks)
    init = functools.partial(init_params, model)
    params = jax.eval_shape(init, jax.random.key(0)) if lower_only else init(jax.random.key(0))
    x_np, y_np = inputs(batch)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    if kind == "forward":
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
        if lower_only:
            return fn.lower(params, x)
        compiled = fn.lower(params, x).compile()

        def step():
            compiled(params, x).block_until_ready()

        return step, compiled

    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = jax.eval_shape(tx.init, params) if lower_only else tx.init(params)

    if kind == "train":

        def loss_fn(p, x, y, key):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    else:  # mae

        def loss_fn(p, x, y, key):
            return model.apply({"params": p}, x, train=True, rngs={"mask": key, "dropout": key})[0]

    def train_step(p, o, x, y, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y, key)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    fn = jax.jit(train_step, donate_argnums=(0, 1))
    key = jax.random.key(1)
    if lower_only:
        return fn.lower(params, opt_state, x, y, key)
    compiled = fn.lower(params, opt_state, x, y, key).compile()
    state = {"p": params, "o": opt_state, "i": 0}

    def step():
        state["i"] += 1
        p, o, loss = compiled(state["p"], state["o"], x, y, jax.random.fold_in(key, state["i"]))
        loss.block_until_ready()
        state["p"], state["o"] = p, o

    return step, compiled


def model_flops(case: dict) -> float:
    """XLA's FLOP count of the case's step as written: lowered with `scan_blocks` and remat off
    (a scan body is counted once, remat recompute counted again), so the same arithmetic for
    both frameworks whatever the JAX variant runs."""
    lowered = jax_case(
        case["kind"], case["name"], case["batch"], scan_blocks=False, lower_only=True
    )
    cost = lowered.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def cpu_flags() -> str:
    """The vector ISA of this CPU (the ratio to PyTorch depends on it: see BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if "model name" in ln), ""
    )
    flags = set(
        next(
            (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
        )
    )
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extra = [f for f in ("avx512_bf16", "amx_bf16", "fma") if f in flags]
    return f"{model}, {isa}" + (f" ({', '.join(extra)})" if extra else "")


def xla_memory_mb(compiled) -> float:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**20


# ---------------------------------------------------------------------- PyTorch side
def torch_case(kind: str, name: str, batch: int):
    import hiera
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = getattr(hiera, name)()
    x_np, y_np = inputs(batch)
    x = torch.from_numpy(np.moveaxis(x_np, -1, 1).copy())
    y = torch.from_numpy(y_np)
    if kind == "forward":
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        if kind == "train":
            loss = F.cross_entropy(model(x), y)
        else:
            loss = model(x, mask_ratio=0.6)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# ---------------------------------------------------------------------- measurement
def timed(step, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        step()
    return (time.perf_counter() - start) / inner


def matmul_gflops(sizes=(1024, 2048, 4096), repeats: int = 5) -> dict[str, float]:
    """Measured f32 matmul rate of this machine: the best median over sizes, for XLA and for
    PyTorch (1 thread and all threads)."""
    import jax
    import jax.numpy as jnp
    import torch

    best = {"jax": 0.0, "torch": 0.0}
    f = jax.jit(lambda a, b: a @ b)
    threads = torch.get_num_threads()
    for n in sizes:
        a = np.random.RandomState(0).randn(n, n).astype(np.float32)
        ja, ta = jnp.asarray(a), torch.from_numpy(a)
        f(ja, ja).block_until_ready()
        flops = 2 * n**3
        jt = [timed(lambda ja=ja: f(ja, ja).block_until_ready(), 1) for _ in range(repeats)]
        best["jax"] = max(best["jax"], flops / statistics.median(jt) / 1e9)
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            torch.mm(ta, ta)
            tt = [timed(lambda ta=ta: torch.mm(ta, ta), 1) for _ in range(repeats)]
            best["torch"] = max(best["torch"], flops / statistics.median(tt) / 1e9)
    torch.set_num_threads(threads)
    return best


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: set up one framework's step, run 3 steps, report RSS."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr or out.stdout)[-500:]}


def child_main(spec: dict) -> None:
    """In a fresh process: import one framework, set up one step, run 3 steps, report RSS.

    `import_rss_mb` is the RSS after importing the framework, so `peak - import` is what the
    model, optimizer state, compilation (JAX) and the steps themselves cost.
    """
    if spec["fw"] == "jax":
        import jax  # noqa: F401
        import optax  # noqa: F401

        import hiera_jax  # noqa: F401

        base = rss_mb()
        step, _ = jax_case(spec["kind"], spec["name"], spec["batch"], spec.get("remat", False))
    else:
        import hiera  # noqa: F401
        import torch

        base = rss_mb()
        torch.set_num_threads(spec.get("torch_threads") or os.cpu_count() or 1)
        step = torch_case(spec["kind"], spec["torch_name"], spec["batch"])
    setup_peak = peak_rss_mb()  # includes XLA compilation for JAX
    try:  # hand memory freed during set-up (compiler scratch) back to the OS, for both
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # reset VmHWM (Linux >= 4.0), so the next peak is that of the steps alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(3):
        step()
    steps_peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "peak_rss_mb": max(setup_peak, steps_peak),
                "steps_peak_rss_mb": steps_peak if reset else None,
                "import_rss_mb": base,
            }
        )
    )


def pick_torch_threads(tstep, requested: int | None) -> int:
    """PyTorch's intra-op thread count for this case: `requested`, or the faster of 1 and all.

    On a shared machine OpenMP's spinning workers can make 2 threads several times slower than
    1 (seen here: tiny forward 0.66 s with 2 threads, 0.16 s with 1), so each case gets the
    better setting; the choice is reported.
    """
    import torch

    if requested:
        torch.set_num_threads(requested)
        return requested
    best = None
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        tstep()
        t = timed(tstep, 1)
        if best is None or t < best[1]:
            best = (n, t)
    torch.set_num_threads(best[0])
    return best[0]


def run_case(
    case: dict, repeats: int, warmup: int, min_time: float, torch_threads: int | None = None
) -> dict:
    kind, batch = case["kind"], case["batch"]
    t0 = time.perf_counter()
    jstep, compiled = jax_case(kind, case["name"], batch, case.get("remat", False))
    compile_s = time.perf_counter() - t0
    tstep = torch_case(kind, case["torch_name"], batch) if case.get("torch", True) else None
    for _ in range(warmup):
        jstep()
        if tstep:
            tstep()
    threads = None
    if tstep:
        threads = pick_torch_threads(tstep, torch_threads)
    # Enough steps per sample that one sample takes >= min_time seconds.
    one = timed(jstep, 1)
    inner = max(1, int(min_time / max(one, 1e-6)))
    jt, tt = [], []
    for _ in range(repeats):  # A B A B: drift on a shared machine hits both alike
        jt.append(timed(jstep, inner))
        if tstep:
            tt.append(timed(tstep, inner))
    flops = model_flops(case)
    j_med = statistics.median(jt)
    row = dict(
        case,
        jax_s=j_med,
        jax_ips=batch / j_med,
        jax_spread=(max(jt) - min(jt)) / j_med,
        gflop=flops / 1e9,
        jax_gflops=flops / j_med / 1e9,
        xla_mem_mb=xla_memory_mb(compiled),
        compile_s=compile_s,
        inner=inner,
    )
    if tstep:
        t_med = statistics.median(tt)
        row.update(
            torch_s=t_med,
            torch_ips=batch / t_med,
            torch_spread=(max(tt) - min(tt)) / t_med,
            torch_gflops=flops / t_med / 1e9,
            ratio=t_med / j_med,
            torch_threads=threads,
        )
    return row


def cases(quick: bool) -> list[dict]:
    out = []
    sizes = ["tiny"] if quick else ["tiny", "base"]
    batches = [1, 8] if not quick else [2]
    for kind in ("forward", "train"):
        for size in sizes:
            for batch in batches:
                name = f"hiera_{size}_224"
                out.append(dict(kind=kind, name=name, torch_name=name, batch=batch))
    mae_sizes = ["tiny"] if quick else ["tiny", "base"]
    mae_batch = 2 if quick else 8
    for size in mae_sizes:
        name = f"mae_hiera_{size}_224"
        out.append(dict(kind="mae", name=name, torch_name=name, batch=mae_batch, remat=False))
        out.append(
            dict(kind="mae", name=name, torch_name=name, batch=mae_batch, remat=True, torch=False)
        )
    return out


def fmt_table(rows: list[dict], mm: dict[str, float]) -> str:
    lines = [
        f"CPU: {cpu_flags()}",
        "",
        f"Machine matmul rate (f32, best of sizes 1024-4096, start and end of the run): XLA {mm['jax']:.1f} GFLOP/s, PyTorch {mm['torch']:.1f} GFLOP/s",
        "",
        "| case | model | batch | JAX img/s | PyTorch img/s (threads) | ratio JAX/PT | GFLOP/step | JAX GFLOP/s (% matmul) | PT GFLOP/s | JAX peak RSS MB: process / steps (+ over import) | PT peak RSS MB: process / steps (+ over import) | XLA memory_analysis MB | spread JAX/PT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = max(mm.values())
    for r in rows:
        kind = r["kind"] + (" +remat" if r.get("remat") else "")
        pt = f"{r['torch_ips']:.2f} ({r['torch_threads']}t)" if "torch_ips" in r else "n/a"
        ratio = f"**{r['ratio']:.2f}x**" if "ratio" in r else "n/a (no remat in official)"
        ptg = f"{r['torch_gflops']:.1f}" if "torch_gflops" in r else "-"

        def mem(key, r=r):
            m = r.get(key)
            if not m:
                return "-"
            if "error" in m:
                return "error"
            steps = m.get("steps_peak_rss_mb") or float("nan")
            return f"{m['peak_rss_mb']:.0f} / {steps:.0f} (+{steps - m['import_rss_mb']:.0f})"

        spread = f"{r['jax_spread']:.0%}/" + (
            f"{r['torch_spread']:.0%}" if "torch_spread" in r else "-"
        )
        lines.append(
            f"| {kind} | {r['name']} | {r['batch']} | {r['jax_ips']:.2f} | {pt} | {ratio} | "
            f"{r['gflop']:.1f} | {r['jax_gflops']:.1f} ({r['jax_gflops'] / best:.0%}) | {ptg} | "
            f"{mem('jax_mem')} | {mem('torch_mem')} | {r['xla_mem_mb']:.0f} | {spread} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny only, batch 2, no memory runs: a few minutes"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=None, help="seconds per sample")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process RSS runs")
    parser.add_argument("--only", default="", help="comma list of kinds: forward,train,mae")
    parser.add_argument("--models", default="", help="comma list of sizes: tiny,base")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="fix PyTorch's threads (default: per case, the faster of 1 and all)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    import jax
    import torch

    repeats = args.repeats or (3 if args.quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 1.0)
    print(
        f"# {cpu_flags()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), load {os.getloadavg()}",
        flush=True,
    )
    mm = matmul_gflops()
    print(f"matmul GFLOP/s: {mm}", flush=True)
    rows = []
    kinds = set(args.only.split(",")) if args.only else None
    for case in cases(args.quick):
        if kinds and case["kind"] not in kinds:
            continue
        if args.models and not any(f"_{m}_" in case["name"] for m in args.models.split(",")):
            continue
        row = run_case(case, repeats, args.warmup, min_time, args.torch_threads)
        if not args.no_memory and not args.quick and case["kind"] != "forward":
            if case["batch"] > 1:
                row["jax_mem"] = memory_child(dict(case, fw="jax"))
                if case.get("torch", True):
                    row["torch_mem"] = memory_child(
                        dict(case, fw="torch", torch_threads=row.get("torch_threads"))
                    )
        rows.append(row)
        print(json.dumps(row), flush=True)
    mm_end = matmul_gflops(sizes=(2048,))
    print(f"# load average at the end: {os.getloadavg()}; matmul GFLOP/s at the end {mm_end}")
    mm = {k: max(mm[k], mm_end[k]) for k in mm}
    print()
    print(fmt_table(rows, mm))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": mm, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
