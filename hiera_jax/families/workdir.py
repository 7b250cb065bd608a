"""Where a model directory is: itself, or the `model/` that train.py writes into a finished
workdir (`init_from` and the Predictor accept either)."""

from __future__ import annotations

import os


def model_directory(found: str, required: bool = True) -> str | None:
    """`found` or `found/model` (a finished workdir), whichever holds config.json."""
    candidates = [found, os.path.join(found, "model")]
    directory = next(
        (c for c in candidates if os.path.isfile(os.path.join(c, "config.json"))), None
    )
    if directory is None and required:
        raise FileNotFoundError(
            f"init_from={found} is neither a model directory (config.json + model.safetensors, "
            "from save_pretrained or convert/convert_pytorch.py), a finished training workdir "
            "holding model/ (it is written when a run ends), nor a pretrained name"
        )
    return directory
