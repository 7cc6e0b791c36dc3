"""The run folder: its identity (``run.json``), the per-epoch checkpoint (``checkpoint.pt``: trainable
parameters, optimizer, loss proxies, epoch, best figure, RNG states), the history and the outputs,
each written atomically (a kill never leaves half a file)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.safetensors"
HISTORY_FILE = "history.json"
PLOT_FILE = "history.png"
SUMMARY_FILE = "training.json"


def atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def save_model(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A full timm state dict as safetensors (what ``--weights PATH`` reads)."""
    from safetensors.torch import save_file

    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial))
    os.replace(partial, path)


def rng_state() -> dict[str, Any]:
    from pytorch_metric_learning.utils import common_functions

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "pml": common_functions.NUMPY_RANDOM.get_state()}


def restore_rng(state: dict[str, Any]) -> None:
    from pytorch_metric_learning.utils import common_functions

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    common_functions.NUMPY_RANDOM.set_state(state["pml"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy, Python and pytorch-metric-learning's own generator (its samplers draw from it)."""
    from pytorch_metric_learning.utils import common_functions

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    common_functions.NUMPY_RANDOM = np.random.RandomState(seed)


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are numpy objects


def prepare_out_dir(out: Path, identity: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Check ``out`` against this run; return the saved identity when it is resumed (None: a new run).

    A folder holding the same run resumes by itself; a different run resumes only with ``--resume``
    (with its own saved settings); anything else is refused.
    """
    run_file = out / RUN_FILE
    if run_file.is_file():
        saved = json.loads(run_file.read_text())
        if saved == identity or resume:
            return saved
        diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise FileExistsError(f"{out} holds another training run (different {', '.join(diff)}); pass --resume "
                              "to continue that run with its own settings, or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {str(out)!r} exists and is not a training run folder; choose another --out")
    if resume:
        raise FileNotFoundError(f"--resume: {out} holds no training run to resume")
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, identity)
    return None
