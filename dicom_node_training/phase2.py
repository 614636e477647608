"""Phase 2: train the sequence model (TCN or GRU + attention) on phase-1 features; predict splits.

Read top to bottom: `train_phase2` (epochs of the paper loss over fixed-length-40 sequences with a
mask, Adam with the learning rate multiplied by 0.9 every 20 optimiser steps, the model with the
lowest validation loss kept) and `predict_split` (best model -> per-study window probabilities
mapped back to the original windows with `from_fixed_length`, nine study probabilities, and the
attention weights).

Outputs: RUN/phase2/last.pt (resume point), RUN/phase2/best.pt, RUN/phase2/history.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from dicom_node.log import get_logger
from dicom_node_training.checkpoint import git_revision, load_checkpoint, resume_state, save_checkpoint
from dicom_node_training.config import TrainConfig, config_to_dict
from dicom_node_training.data import SequenceDataset, load_cache_index, load_split, seed_worker
from dicom_node_training.distributed import DistContext, gather, setup, shard
from dicom_node_training.evaluate import SplitPredictions, auroc, evaluate, write_report
from dicom_node_training.loss import sequence_loss
from dicom_node_training.models import sequence_model
from dicom_node_training.models.sequence import SequenceOutput
from dicom_node_training.phase1 import make_deterministic

__all__ = ["train_phase2", "predict_split", "evaluate_run", "build_sequence_model"]

log = get_logger("dicom_node_training.phase2")


def _feature_dim(feat_dir: Path, uid: str) -> int:
    return int(np.load(feat_dir / f"{uid}.npy", mmap_mode="r").shape[1])


def build_sequence_model(config: TrainConfig, in_features: int) -> torch.nn.Module:
    p2 = config.phase2
    return sequence_model(kind=p2.kind, in_features=in_features, hidden=p2.hidden, levels=p2.levels,
                          kernel_size=p2.kernel_size, dropout=p2.dropout, causal=p2.causal)


def _batches(ds: Dataset[Any], batch_size: int, workers: int, sampler: Sampler[int] | None = None,
             seed: int = 0) -> DataLoader[Any]:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      worker_init_fn=seed_worker, generator=g)


def _loss(out: SequenceOutput, b: dict[str, torch.Tensor], config: TrainConfig) -> torch.Tensor:
    return sequence_loss(out.window_logits.float(), out.study_logits.float(), b["window_labels"], b["study_labels"],
                         b["mask"], q=b["q"], normalization=config.phase2.loss_normalization)


@torch.no_grad()
def _forward_all(model: torch.nn.Module, ds: SequenceDataset, ctx: DistContext, batch_size: int,
                 workers: int) -> dict[str, torch.Tensor]:
    """Eval-mode outputs for the whole dataset (sharded over processes, gathered in order)."""
    model.eval()
    idx = shard(list(range(len(ds))), ctx)
    keys = ("window_logits", "study_logits", "attention", "window_labels", "study_labels", "mask", "q", "n_windows")
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for b in _batches(Subset(ds, idx), batch_size, workers):
        b = {k: v.to(ctx.device) for k, v in b.items()}
        out = model(b["features"], b["mask"])
        for k, v in (("window_logits", out.window_logits), ("study_logits", out.study_logits), ("attention", out.attention)):
            acc[k].append(v.float().cpu())
        for k in keys[3:]:
            acc[k].append(b[k].cpu())
    # tensors; None only in an empty shard, which the merge below skips
    local: tuple[list[int], dict[str, Any]] = (idx, {k: torch.cat(v) if v else None for k, v in acc.items()})
    merged: dict[str, torch.Tensor] = {}
    for i, part in gather(local, ctx):
        if not i:
            continue
        for k, v in part.items():
            if k not in merged:
                merged[k] = torch.zeros((len(ds), *v.shape[1:]), dtype=v.dtype)
            merged[k][torch.as_tensor(i)] = v
    return merged


def _split_loss(o: dict[str, torch.Tensor], config: TrainConfig) -> float:
    return float(sequence_loss(o["window_logits"], o["study_logits"], o["window_labels"], o["study_labels"], o["mask"],
                               q=o["q"], normalization=config.phase2.loss_normalization))


def train_phase2(config: TrainConfig, run_dir: str | os.PathLike[str], ctx: DistContext | None = None, *,
                 resume: bool = True, progress: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Train phase 2 on RUN/features (resuming from RUN/phase2/last.pt); return the best epoch and history."""
    from tqdm import tqdm

    ctx = ctx or setup(config.device)
    run = Path(run_dir)
    out_dir, feat_dir = run / "phase2", run / "features"
    p2 = config.phase2
    make_deterministic(config.seed, ctx.device)
    if p2.batch_size % ctx.world_size:
        raise ValueError(f"phase2.batch_size {p2.batch_size} is not divisible by {ctx.world_size} processes")
    per_rank = p2.batch_size // ctx.world_size
    split = load_split(run / "split.json")
    train_ds = SequenceDataset(feat_dir, load_cache_index(run, split.train), p2.seq_len)
    val_ds = SequenceDataset(feat_dir, load_cache_index(run, split.validation), p2.seq_len)
    if len(train_ds) == 0:
        raise ValueError(f"{run}: no training studies with features; run `dicom-node-train features` first")
    model = build_sequence_model(config, _feature_dim(feat_dir, train_ds.uids[0])).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=p2.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=p2.lr_decay_every, gamma=p2.lr_decay)
    fresh: dict[str, Any] = {"epoch": None, "value": math.inf, "criterion": "val_loss"}
    last_path = out_dir / "last.pt"
    history: list[dict[str, Any]] = []
    start_epoch, step, best = 0, 0, fresh
    if resume:
        start_epoch, step, history, best = resume_state(
            last_path, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, fresh)
        if ctx.is_main and start_epoch:
            log.info("phase2_resumed", from_epoch=start_epoch, step=step)
    train_model: torch.nn.Module = model
    if ctx.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    sampler: DistributedSampler[Any] = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
    bar = tqdm(range(start_epoch, p2.epochs), desc="phase2", unit="epoch", disable=not (progress and ctx.is_main))
    for epoch in bar:
        t0 = time.perf_counter()
        torch.manual_seed(config.seed + 1000 * epoch)  # dropout; resume-stable
        sampler.set_epoch(epoch)
        train_model.train()
        loss_sum, batches = 0.0, 0
        for b in _batches(train_ds, per_rank, config.num_workers, sampler=sampler, seed=config.seed + epoch):
            b = {k: v.to(ctx.device) for k, v in b.items()}
            loss = _loss(train_model(b["features"], b["mask"]), b, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.detach().item()
            batches += 1
            if max_steps is not None and step >= max_steps:
                break
        train_loss = sum(gather(loss_sum, ctx)) / max(sum(gather(batches, ctx)), 1)
        val = _forward_all(model, val_ds, ctx, per_rank, config.num_workers) if len(val_ds) else None
        val_loss = _split_loss(val, config) if val else float("nan")
        metrics: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": train_loss, "val_loss": val_loss,
                   "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3)}
        history.append(metrics)
        improved = best["epoch"] is None or (not math.isnan(val_loss) and val_loss < best["value"])
        if improved:
            best = {"epoch": epoch, "value": val_loss, "criterion": "val_loss"}
        if ctx.is_main:
            payload = {"phase": 2, "epoch": epoch, "step": step, "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "in_features": model_in_features(model), "config": config_to_dict(config),
                       "metrics": metrics, "history": history, "best": best, "git_revision": git_revision(),
                       "world_size": ctx.world_size}
            if improved:
                save_checkpoint(out_dir / "best.pt", payload)
            save_checkpoint(last_path, payload)
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
            log.info("epoch_finished", phase=2, epoch=epoch, loss=round(train_loss, 5), val_loss=round(val_loss, 5),
                     seconds=metrics["seconds"], best_epoch=best["epoch"])
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if max_steps is not None and step >= max_steps:
            break
    if ctx.is_main:
        (out_dir / "done.json").write_text(json.dumps({"best": best, "epochs": p2.epochs, "step": step}, indent=1))
    return {"best": best, "history": history}


def model_in_features(model: torch.nn.Module) -> int | None:
    return getattr(model, "in_features", None)


def predict_split(config: TrainConfig, run_dir: str | os.PathLike[str], split_name: str, ctx: DistContext | None = None,
                  checkpoint: str = "best.pt") -> tuple[SplitPredictions, dict[str, Any]]:
    """Best phase-2 model on one split -> (`SplitPredictions`, extras).

    Window logits are mapped back to each study's N original windows with `from_fixed_length`
    (inside `SplitPredictions.from_logits`). Extras: `loss` (paper loss over the split),
    `attention` (S, 9, L), `phase1_window_probs` (per study, from RUN/features/<study>.probs.npy).
    """
    ctx = ctx or setup(config.device)
    run = Path(run_dir)
    feat_dir = run / "features"
    entries = load_cache_index(run, load_split(run / "split.json")[split_name])
    ds = SequenceDataset(feat_dir, entries, config.phase2.seq_len)
    ck = load_checkpoint(run / "phase2" / checkpoint)
    in_features = ck.get("in_features") or _feature_dim(feat_dir, ds.uids[0])
    model = build_sequence_model(config, in_features).to(ctx.device)
    model.load_state_dict(ck["model"])
    if not len(ds):
        empty = SplitPredictions((), (), (), np.zeros((0, 9)), np.zeros((0, 9)))
        return empty, {"loss": float("nan"), "attention": np.zeros((0, 9, config.phase2.seq_len)), "phase1_window_probs": ()}
    o = _forward_all(model, ds, ctx, config.phase2.batch_size, 0)
    pred = SplitPredictions.from_logits(
        study_uids=ds.uids, window_logits=o["window_logits"].numpy(), n_windows=[entries[u].n_windows for u in ds.uids],
        window_labels=[entries[u].window_labels for u in ds.uids], study_logits=o["study_logits"].numpy(),
        study_labels=o["study_labels"].numpy())
    p1 = tuple(np.load(feat_dir / f"{u}.probs.npy") for u in ds.uids)
    return pred, {"loss": _split_loss(o, config), "attention": o["attention"].numpy(), "phase1_window_probs": p1}


def evaluate_run(config: TrainConfig, run_dir: str | os.PathLike[str], ctx: DistContext | None = None, *,
                 n_resamples: int = 1000) -> dict[str, Any]:
    """Best phase-2 model on validation and test -> RUN/report.json, report.md, ROC plots.

    Thresholds come from validation only (see `dicom_node_training.evaluate`). The phase-1 window AUROC on
    test is added under `phase1.test_auroc_window` for comparison with the phase-2 window head.
    """
    ctx = ctx or setup(config.device)
    run = Path(run_dir)
    val, val_extra = predict_split(config, run, "validation", ctx)
    test, test_extra = predict_split(config, run, "test", ctx)
    if not ctx.is_main:
        return {}
    report = evaluate(val, test, n_resamples=n_resamples, seed=config.seed)
    y = np.concatenate(test.window_labels) if test.window_labels else np.zeros(0)
    p = np.concatenate(test_extra["phase1_window_probs"]) if test_extra["phase1_window_probs"] else np.zeros(0)
    extra = {"phase1": {"test_auroc_window": auroc(y, p)},
             "loss": {"validation": val_extra["loss"], "test": test_extra["loss"]}}  # NaN -> null in write_report
    paths = write_report(report, run, validation=val, test=test, extra=extra)
    data = json.loads(paths["json"].read_text())
    np.savez_compressed(run / "predictions_test.npz", study_uids=np.array(test.study_uids),
                        study_probs=test.study_probs, study_labels=test.study_labels,
                        attention=test_extra["attention"])
    log.info("evaluation_written", report=str(paths["json"]), test_studies=len(test.study_uids),
             validation_studies=len(val.study_uids))
    return data
