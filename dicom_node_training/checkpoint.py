"""Training checkpoints: model + optimiser state for resume, with the config, metrics and git revision.

A checkpoint is a dict saved with `torch.save` (atomically: temp file, then rename)::

    {"phase": 1 | 2, "epoch": last finished epoch (0-based), "step": optimiser steps so far,
     "model": state_dict (never DDP-wrapped), "optimizer": ..., "scaler": ..., "scheduler": ...,
     "config": TrainConfig as a dict, "metrics": {...this epoch...}, "history": [...per epoch...],
     "best": {"epoch": ..., "value": ..., "criterion": ...}, "git_revision": "<sha>" or "unknown"}
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["git_revision", "save_checkpoint", "load_checkpoint", "resume_state"]


def git_revision() -> str:
    """`git rev-parse HEAD` of the source tree, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file; run the step that writes it first")
    return torch.load(path, map_location=map_location, weights_only=False)


def resume_state(last_path: str | os.PathLike[str], stateful: dict[str, Any],
                 fresh_best: dict[str, Any]) -> tuple[int, int, list[dict[str, Any]], dict[str, Any]]:
    """Restore `stateful` ({"model": m, "optimizer": o, "scaler"|"scheduler": ...}) from `last_path` when it
    exists; return (start epoch, optimiser step, history, best) to continue from (a fresh start otherwise)."""
    if not Path(last_path).is_file():
        return 0, 0, [], fresh_best
    ck = load_checkpoint(last_path)
    for key, obj in stateful.items():
        obj.load_state_dict(ck[key])
    return ck["epoch"] + 1, ck["step"], ck["history"], ck["best"]
