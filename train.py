"""Train Hiera: MAE pretraining or supervised finetuning, sharded over a device mesh.

    python train.py                                             # embedded default: digits MAE
    python train.py --config configs/digits_finetune.py --workdir runs/digits_finetune
    python train.py --config configs/in1k_mae.py:base --workdir /mnt/gcs/run --config.batch_size=4096
    # will it fit a v5e-64? compile the step for that slice here, on the CPU (pip install -e '.[tpu]')
    python train.py --config configs/in1k_mae.py:base --workdir runs/aot --aot v5e:8x8

Everything lives in `hiera_jax.training`; this file only parses flags. Multi-host: add
`--multi_process` (TPU pods, SLURM, Open MPI and k8s auto-detect) or the explicit coordinator flags.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "digits_mae.py")
DEFAULT_WORKDIR = os.path.join(".", "runs", "digits_mae")


def fail(error: BaseException) -> None:
    """One line on stderr and exit status 2; --verbose shows the traceback instead."""
    text = " ".join(str(error).split()) or type(error).__name__
    sys.stderr.write(f"error: {text} (--verbose for the traceback)\n")
    if _distributed():
        # JAX's shutdown at exit waits for every process at a barrier: a failed or lost peer
        # would hold this one there until the coordination service aborts it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def _distributed() -> bool:
    """True once jax.distributed.initialize has run (asked without starting a backend)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import distributed

    return distributed.global_state.client is not None


def check_command_line(argv: list[str]) -> None:
    """The --config file and its --config.KEY overrides, checked before absl parses them (its own
    errors for these are long tracebacks), so a typo costs one line and creates nothing."""
    from hiera_jax.training.config import check_overrides

    try:
        check_overrides(argv, DEFAULT_CONFIG)
    except (ValueError, OSError) as e:
        if "--verbose" in argv:
            raise
        fail(e)


if __name__ == "__main__":  # before DEFINE_config_file, which applies sys.argv's overrides
    check_command_line(sys.argv)

config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Training config file (ml_collections get_config).", lock_config=True
)
flags.DEFINE_string(
    "workdir", None, f"Run directory (default {DEFAULT_WORKDIR} for the default config)."
)
flags.DEFINE_bool("multi_process", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host, no auto-detect)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, no auto-detect).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host, no auto-detect).")
flags.DEFINE_string(
    "aot",
    None,
    "Fit check, nothing run: compile the train step for this TPU slice (TYPE:AxB[xC] in chips, "
    "e.g. v5e:8x8, v5p:4x4x2, v4:4x4x2) or these NVIDIA GPUs (CHIP:N or CHIP:HOSTSxN, CHIP one "
    "of a100-40gb, a100, h100, h200, b200; the gpu extra) and report memory, FLOPs, HBM traffic "
    "and collectives.",
)
flags.DEFINE_bool("verbose", False, "Show the full traceback of an error, not one line.")
flags.DEFINE_integer("aot_slices", 1, "--aot: number of slices (multi-slice, data over DCN).")
flags.DEFINE_float(
    "aot_effort",
    -1.0,
    "--aot: "
    + (
        "XLA exec_time_optimization_effort in [-1, 1]: -1 compiles about 3x faster than 0 (the "
        "default of a real run; 40 against 130 s for a base MAE step on 2 cores) and moves memory "
        "figures by 1-2%; 0 gives the exact program."
    ),
)
FLAGS = flags.FLAGS


def config_name() -> str:
    """`digits_mae`, `in1k_mae:base`, ... from the --config path."""
    spec = FLAGS["config"].config_filename
    path, _, arg = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}:{arg}" if arg else name


def run_aot(config, workdir: str) -> None:
    """--aot: compile for the slice or GPUs, print the report, write it as JSON; exit 1 if it
    won't fit."""
    from hiera_jax.training.cost import aot

    try:
        report = aot.fit_check(
            config,
            FLAGS.aot,
            num_slices=FLAGS.aot_slices,
            effort=FLAGS.aot_effort,
            config_name=config_name(),
        )
    except aot.DoesNotFit as e:
        path = aot.write_report({**e.report, "advice": e.advice}, workdir)
        tips = "; ".join(e.advice)
        raise SystemExit(f"DOES NOT FIT: {e.reason}. Try: {tips}. (report: {path})") from None
    except (ValueError, RuntimeError) as e:  # a bad topology name, no compiler: one line, exit 2
        raise ValueError(str(e)) from None
    path = aot.write_report(report, workdir)
    print(aot.format_report(report), flush=True)
    print(f"  report: {path}", flush=True)
    print(aot.summary_line(report), flush=True)


def enable_compilation_cache(config, workdir: str) -> None:
    """JAX's persistent compilation cache, so a restarted or resumed run does not recompile."""
    directory = str(config.get("compilation_cache_dir", ""))
    if directory.lower() in ("none", "off"):
        return
    import jax

    directory = directory or os.path.join(workdir, "compilation_cache")
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    # orbax logs every save at INFO through absl; keep the terminal for the progress bar.
    absl_logging.set_verbosity(absl_logging.WARNING)
    from hiera_jax.training.checkpoint import CheckpointError
    from hiera_jax.training.peers import PeersLost
    from hiera_jax.training.quiet import quiet_library_noise
    from hiera_jax.training.workdir_lock import WorkdirInUse

    if not FLAGS.verbose:  # an error ends in our one line, not in orbax's tracebacks after it
        quiet_library_noise()

    try:
        run(FLAGS.config)
    except (ValueError, OSError, CheckpointError, FloatingPointError, WorkdirInUse, PeersLost) as e:
        if FLAGS.verbose:
            raise
        fail(e)


def run(config) -> None:
    import jax

    from hiera_jax.training.config import validate_config

    validate_config(config)
    if FLAGS.aot_slices < 1:
        raise ValueError(f"--aot_slices must be >= 1, got {FLAGS.aot_slices}")
    if not -1.0 <= FLAGS.aot_effort <= 1.0:
        raise ValueError(f"--aot_effort must be in [-1, 1], got {FLAGS.aot_effort}")
    if FLAGS.multi_process or FLAGS.coordinator_address:
        kwargs = {
            k: v
            for k, v in dict(
                coordinator_address=FLAGS.coordinator_address,
                num_processes=FLAGS.num_processes,
                process_id=FLAGS.process_id,
            ).items()
            if v is not None
        }
        jax.distributed.initialize(**kwargs)
    from hiera_jax.models.backends import start_quietly

    start_quietly(FLAGS.verbose)  # a CPU-only machine: the GPU/TPU plugins' noise as one line

    from hiera_jax.training import train_and_evaluate

    workdir = FLAGS.workdir
    if workdir is None:
        workdir = os.path.join(".", "runs", config_name().split(":")[0])
    if FLAGS.aot:
        from hiera_jax.training.loop import local_path

        run_aot(config, local_path(workdir, "workdir"))
        return
    if "://" not in workdir:
        enable_compilation_cache(config, workdir)
    summary = train_and_evaluate(config, workdir)
    if jax.process_index() != 0:
        return
    if summary["stopped_early"]:
        print(
            f"Stopped early at step {summary['step']} (signal); the checkpoint is saved: run the "
            "same command to resume.",
            flush=True,
        )
    else:
        parts = [f"step {summary['step']}"]
        if summary["eval"]:
            parts.append(", ".join(f"eval {k} {v:.4g}" for k, v in summary["eval"].items()))
        print("Finished: " + "; ".join(parts), flush=True)
    where = [f"checkpoints in {summary['checkpoint_dir']}"]
    if summary["model_dir"]:
        where.append(f"model (from_pretrained, here or in transformers) in {summary['model_dir']}")
    if summary["pictures_dir"]:
        where.append(f"reconstruction pictures in {summary['pictures_dir']}")
    where.append(f"metrics in {summary['metrics_file']} and {summary['workdir']}/tensorboard")
    print("Output: " + "; ".join(where), flush=True)


if __name__ == "__main__":
    app.run(main)
