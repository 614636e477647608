"""Training checkpoints: model + optimiser state for resume, with the config, metrics and git revision.

A checkpoint is a dict saved with `torch.save` (atomically: temp file, then rename)::

    {"phase": 1 | 2, "epoch": last finished epoch (0-based), "step": optimiser steps so far,
     "model": state_dict (never DDP-wrapped), "optimizer": ..., "scaler": ..., "scheduler": ...,
     "config": TrainConfig as a dict, "metrics": {...this epoch...}, "history": [...per epoch...],
     "best": {"epoch": ..., "value": ..., "criterion": ...},
     "git_revision": "<sha>", "<sha>-dirty" or "unknown (source sha256 <16 hex digits>)"}
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["git_revision", "source_digest", "save_checkpoint", "load_checkpoint", "resume_state"]


#: the packages whose code decides what a trained model is: the training loop, the shared preprocessing and
#: model code the node runs, the export
_SOURCE_PACKAGES = ("dicom_node_training", "dicom_node_export", "dicom_node/imaging", "dicom_node/model")


def source_digest() -> str:
    """sha256 (first 16 hex digits) of the Python sources of `_SOURCE_PACKAGES`, path and bytes, in path order:
    names the code a run was trained with when git cannot (a copy of the tree, an installed package)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        for f in sorted((root / package).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_revision() -> str:
    """The code a run is trained with, for its checkpoints and the bundle's model card: `git rev-parse HEAD`,
    with `-dirty` when tracked files differ from it (the commit alone would not reproduce the run); outside a
    git checkout `unknown (source sha256 <source_digest>)`."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, changed = "", ""
    if head:
        return f"{head}-dirty" if changed else head
    return f"unknown (source sha256 {source_digest()})"


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
