"""The whole training run as five resumable steps: cache -> phase1 -> features -> phase2 -> evaluate.

A run directory RUN holds everything one run makes::

    RUN/config.json      the TrainConfig of the run (written by the first step; later steps use it)
    RUN/split.json       study-level split
    RUN/cache/           preprocessed windows (uint8), done.json when complete
    RUN/phase1/          last.pt, best.pt, history.json, done.json
    RUN/features/        <study>.npy (N, F), <study>.probs.npy (N,), done.json
    RUN/phase2/          last.pt, best.pt, history.json, done.json
    RUN/report.json      + report.md, roc_*.png, predictions_test.npz

`fit` skips every step whose done marker exists and continues an interrupted phase from its
last.pt, so the same command after a crash picks up where it stopped. The cache step checks its
inputs (`dicom_node_training.data.check_rsna_data`: the folder, train.csv and its columns, at least one
study) before anything is written to RUN, so a wrong --data leaves no config.json behind.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.log import get_logger
from dicom_node_training.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, load_config
from dicom_node_training.distributed import DistContext, barrier, setup

if TYPE_CHECKING:
    from dicom_node_training.data import StudyRecord  # dicom_node_training.data imports torch: only inside the steps

__all__ = ["STEPS", "RunError", "resolve_config", "step_done", "run_step", "fit"]

log = get_logger("dicom_node_training.fit")

STEPS: tuple[str, ...] = ("cache", "phase1", "features", "phase2", "evaluate")
_RUNTIME_KEYS = ("device", "num_workers", "amp")  # may differ between invocations of one run
_DONE = {"cache": "cache/done.json", "phase1": "phase1/done.json", "features": "features/done.json",
         "phase2": "phase2/done.json", "evaluate": "report.json"}


class RunError(RuntimeError):
    """The run directory and the request disagree; the message says how to fix it."""


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _RUNTIME_KEYS}


def resolve_config(run_dir: str | os.PathLike[str], preset: str | None = None, config_file: Path | str | None = None,
                   *, device: str | None = None,
                   workers: int | None = None, new_run: bool = False, pretrained: str | None = None) -> TrainConfig:
    """The run's config: RUN/config.json when it exists (checked against --preset/--config), else the preset.

    `new_run=True` refuses a RUN that already holds a run (fit without --resume).
    Runtime settings (device, workers) never make configs differ.
    """
    run = Path(run_dir)
    stored_path = run / "config.json"
    asked = load_config(preset or "paper", config_file) if (preset or config_file) else None
    if stored_path.is_file():
        if new_run:
            raise RunError(f"{run} already holds a run ({stored_path}); pass --resume to continue it, or choose a new --out")
        stored = config_from_dict(json.loads(stored_path.read_text()))
        if asked is not None and _comparable(config_to_dict(asked)) != _comparable(config_to_dict(stored)):
            diff = _diff(config_to_dict(stored), config_to_dict(asked))
            raise RunError(f"{run}: the run was made with another config ({'; '.join(diff[:5])}); "
                           f"drop --preset/--config to use the stored one, or choose a new --out")
        config = stored
    else:
        if asked is None:
            asked = load_config("paper")
        config = asked
    if device:
        config = replace(config, device=device)
    if pretrained:
        if not Path(pretrained).is_file():
            raise ConfigError(f"--pretrained {pretrained}: no such file; pass a local Kinetics-400 r3d_18 state_dict "
                              "(.pth/.pt) or leave it out for random initialisation")
        if config.family == "shi2020":
            config = replace(config, shi1=replace(config.shi1, pretrained=str(pretrained)))
        else:
            config = replace(config, phase1=replace(config.phase1, pretrained=str(pretrained)))
    if workers is not None:
        if workers < 0:
            raise ConfigError(f"--workers {workers}: must be >= 0")
        config = replace(config, num_workers=workers)
    return config


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb and k not in _RUNTIME_KEYS:
            out.append(f"{prefix}{k}: run has {va!r}, asked {vb!r}")
    return out


def _save_config(config: TrainConfig, run: Path) -> None:
    path = run / "config.json"
    if not path.is_file():
        path.write_text(json.dumps(config_to_dict(config), indent=1))


def step_done(step: str, run_dir: str | os.PathLike[str]) -> bool:
    return (Path(run_dir) / _DONE[step]).is_file()


def run_step(step: str, config: TrainConfig, data_dir: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str],
             ctx: DistContext, *, progress: bool = True) -> dict[str, Any]:
    """Run one step (resuming a phase from its last.pt when there is one).

    The cache step raises `dicom_node_training.data.DataError` for bad --data before RUN is touched."""
    run = Path(run_dir)
    records = None
    if step == "cache":
        from dicom_node_training.data import check_rsna_data
        records = check_rsna_data(data_dir)  # every rank: the same files, so the same verdict
    if ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
        _save_config(config, run)
    barrier(ctx)
    t0 = time.perf_counter()
    if step == "cache":
        assert data_dir is not None and records is not None  # check_rsna_data passed
        result = _cache_step(config, data_dir, records, run, ctx, progress)
    elif config.family == "shi2020" and step != "cache":  # same steps, same files, the other family's models
        from dicom_node_training import shi
        result = {"phase1": shi.train_stage1, "features": shi.extract_features, "phase2": shi.train_stage2,
                  "evaluate": shi.evaluate_run}[step](config, run, progress=progress)
    elif step == "phase1":
        from dicom_node_training.phase1 import train_phase1
        result = train_phase1(config, run, ctx, resume=True, progress=progress)
    elif step == "features":
        from dicom_node_training.phase1 import extract_features
        result = extract_features(config, run, ctx, progress=progress)
    elif step == "phase2":
        from dicom_node_training.phase2 import train_phase2
        result = train_phase2(config, run, ctx, resume=True, progress=progress)
    elif step == "evaluate":
        from dicom_node_training.phase2 import evaluate_run
        result = evaluate_run(config, run, ctx)
    else:
        raise ValueError(f"step {step!r}: expected one of {', '.join(STEPS)}")
    barrier(ctx)
    if ctx.is_main:
        log.info("step_finished", step=step, seconds=round(time.perf_counter() - t0, 2))
    return result


def _cache_step(config: TrainConfig, data_dir: str | os.PathLike[str], records: dict[str, StudyRecord], run: Path,
                ctx: DistContext, progress: bool) -> dict[str, Any]:
    from dicom_node_training.data import build_cache, load_split, make_split, save_split

    summary: dict[str, Any] = {}
    if ctx.is_main:  # one process preprocesses (with its own worker pool); the others wait
        split_path = run / "split.json"
        if not split_path.is_file():
            split = make_split(records, config.seed, config.split)
            save_split(split, split_path)
            log.info("split_written", train=len(split.train), validation=len(split.validation), test=len(split.test))
        split = load_split(split_path)
        wanted = {u: records[u] for u in (*split.train, *split.validation, *split.test) if u in records}
        summary = build_cache(data_dir, run, wanted, config.preprocess, workers=config.num_workers, progress=progress)
        (run / "cache" / "done.json").write_text(json.dumps(summary, indent=1))
    return summary


def fit(data_dir: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str], config: TrainConfig, *,
        steps: Sequence[str] = STEPS, progress: bool = True, ctx: DistContext | None = None) -> dict[str, Any]:
    """Run the steps in order, skipping those already done; return {step: result or "skipped"}."""
    ctx = ctx or setup(config.device)
    results: dict[str, Any] = {}
    for step in steps:
        if step_done(step, run_dir):
            if ctx.is_main:
                log.info("step_skipped", step=step, reason="done marker exists", marker=_DONE[step])
            results[step] = "skipped"
            continue
        results[step] = run_step(step, config, data_dir, run_dir, ctx, progress=progress)
    return results
