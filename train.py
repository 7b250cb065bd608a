"""Train Hiera: MAE pretraining or supervised finetuning, sharded over a device mesh.

    python train.py                                             # embedded default: digits MAE
    python train.py --config configs/digits_finetune.py --workdir runs/digits_finetune
    python train.py --config configs/in1k_mae.py:base --workdir /mnt/gcs/run --config.batch_size=4096

Everything lives in `hiera_jax.training`; this file only parses flags. Multi-host: add
`--multi_process` (TPU pods, SLURM, Open MPI and k8s auto-detect) or the explicit coordinator flags.
"""

from __future__ import annotations

import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "digits_mae.py")
DEFAULT_WORKDIR = os.path.join(".", "runs", "digits_mae")

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
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    # orbax logs every save at INFO through absl; keep the terminal for the progress bar.
    absl_logging.set_verbosity(absl_logging.WARNING)
    import jax

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

    from hiera_jax.training import train_and_evaluate

    workdir = FLAGS.workdir
    if workdir is None:
        name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename.split(":")[0]))[0]
        workdir = os.path.join(".", "runs", name)
    summary = train_and_evaluate(FLAGS.config, workdir)
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
        where.append(f"model (load_pretrained) in {summary['model_dir']}")
    if summary["pictures_dir"]:
        where.append(f"reconstruction pictures in {summary['pictures_dir']}")
    where.append(f"metrics in {summary['metrics_file']} and {summary['workdir']}/tensorboard")
    print("Output: " + "; ".join(where), flush=True)


if __name__ == "__main__":
    app.run(main)
