"""Phase 1: train the 3D ResNet-18 window classifier, then extract per-window features.

Read top to bottom: `train_phase1` (one loop over epochs: train with BCE, validate, AUROC, keep
the best model) and `extract_features` (best model -> RUN/features/<study>.npy (N, F) float32
and RUN/features/<study>.probs.npy (N,) phase-1 window probabilities, every split).

Paper settings (Ma et al. 2022): Adam lr 4e-4, batch 16, 20 epochs, training windows randomly
cropped 192 of 224 and rotated within +-15 degrees, the model with the best validation AUROC
kept. The model is selected by validation AUROC when the validation windows hold both classes,
otherwise (tiny data) by validation loss; `phase1.keep = "last"` keeps the last epoch instead.

Outputs: RUN/phase1/last.pt (resume point, every epoch), RUN/phase1/best.pt, RUN/phase1/history.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node.labels import STUDY_LABELS
from dicom_node.log import get_logger
from dicom_node_training.checkpoint import git_revision, load_checkpoint, resume_state, save_checkpoint
from dicom_node_training.config import Phase1Config, TrainConfig, config_to_dict
from dicom_node_training.data import WindowDataset, load_cache_index, load_split, seed_worker
from dicom_node_training.distributed import DistContext, gather, setup, shard
from dicom_node_training.evaluate import auroc, study_maxima
from dicom_node_training.loss import attention_dice_loss
from dicom_node_training.models import r3d_18
from dicom_node_training.models.r3d import WindowOutput, cam, cam_grid

__all__ = ["BalancedSampler", "StudyLabelHead", "study_max_auroc", "train_phase1", "extract_features", "predict_windows", "make_deterministic", "autocast_for", "lr_at"]

log = get_logger("dicom_node_training.phase1")


def make_deterministic(seed: int, device: torch.device) -> None:
    """Seed torch/numpy and ask for deterministic kernels (exact on CPU; best effort on CUDA)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False


def autocast_for(device: torch.device, amp: bool) -> torch.autocast:
    """Mixed precision (float16) on CUDA when `amp`; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.float16, enabled=bool(amp and device.type == "cuda"))


def lr_at(p1: Phase1Config, step: int, steps_per_epoch: int) -> float:
    """Phase-1 learning rate at optimiser step `step`: constant (the paper) or a cosine decay from
    `lr` to 0 over all `epochs` (`lr_schedule = "cosine"`). A function of the step only, so a
    resumed run continues the same curve."""
    if p1.lr_schedule == "constant":
        return p1.lr
    total = max(1, p1.epochs * steps_per_epoch)
    return 0.5 * p1.lr * (1.0 + math.cos(math.pi * min(step, total) / total))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return cast(torch.nn.Module, model.module) if hasattr(model, "module") else model  # DDP wraps it in .module


class BalancedSampler(Sampler[int]):
    """Each epoch, `num_samples` window indices (default: as many as there are windows) drawn with
    replacement so that `positive_fraction` of them are positive windows; or, with
    `positive_fraction=None`, drawn uniformly without replacement (a fresh subset each epoch, for
    large data sets where one epoch should not visit every window). Seeded by (seed, epoch),
    sharded by rank like DistributedSampler.

    `level_matched` (with `levels`, each window's relative position 0..1 along its study): this
    share of the negative draws follows the level distribution of the positive windows (negative
    windows at the height where emboli sit, i.e. the pulmonary arteries), the rest is uniform. It
    stops the model from scoring a window by its height alone."""

    LEVEL_BINS = 10

    def __init__(self, labels: ArrayLike, positive_fraction: float | None, *, num_samples: int | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, levels: ArrayLike | None = None, level_matched: float = 0.0) -> None:
        if positive_fraction is not None and not 0.0 < positive_fraction < 1.0:
            raise ValueError(f"phase1.positive_fraction={positive_fraction}; expected a fraction in (0, 1) or None")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"phase1.windows_per_epoch={num_samples}; expected at least 1 or None (every window)")
        if not 0.0 <= level_matched <= 1.0:
            raise ValueError(f"phase1.level_matched_negatives={level_matched}; expected a share in [0, 1]")
        if level_matched and (positive_fraction is None or levels is None):
            raise ValueError("phase1.level_matched_negatives needs phase1.positive_fraction (balanced draws) "
                             "and the windows' levels; set positive_fraction or level_matched_negatives = 0")
        y = np.asarray(labels) > 0.5
        self.pos, self.neg = np.flatnonzero(y), np.flatnonzero(~y)
        if positive_fraction is not None and (len(self.pos) == 0 or len(self.neg) == 0):
            raise ValueError(f"phase1.positive_fraction needs positive and negative training windows "
                             f"(have {len(self.pos)} positive, {len(self.neg)} negative)")
        self.n = len(y) if num_samples is None else int(num_samples)
        self.fraction, self.rank, self.world, self.seed, self.epoch = positive_fraction, rank, world_size, seed, 0
        self.total = len(y)
        self.per_rank = -(-self.n // world_size)
        self.neg_p = None  # None = uniform over negatives
        if level_matched:
            bins = np.clip((np.asarray(levels, dtype=np.float64) * self.LEVEL_BINS).astype(int), 0, self.LEVEL_BINS - 1)
            pos_share = np.bincount(bins[self.pos], minlength=self.LEVEL_BINS) / len(self.pos)
            neg_count = np.bincount(bins[self.neg], minlength=self.LEVEL_BINS)
            b = bins[self.neg]
            matched = pos_share[b] / neg_count[b]  # each negative's bin holds it, so the count is >= 1
            if matched.sum() > 0:  # else no negative window shares a height with a positive one: stay uniform
                self.neg_p = level_matched * matched / matched.sum() + (1.0 - level_matched) / len(self.neg)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        want = self.per_rank * self.world
        if self.fraction is None:
            idx = np.concatenate([rng.permutation(self.total) for _ in range(-(-want // self.total))])[:want]
        else:
            n_pos = int(round(self.fraction * want))
            idx = np.concatenate([rng.choice(self.pos, n_pos), rng.choice(self.neg, want - n_pos, p=self.neg_p)])
            rng.shuffle(idx)
        return iter(idx[self.rank::self.world].tolist())


class AttentionCells:
    """Pools a batch of window masks (B, D, H, W) to the CAM's cells (B, t, h, w) with the network's own
    cell centres (`CamGrid.membership`), so the attention loss asks for heat where the node will draw it."""

    def __init__(self, grid: CamGrid, device: torch.device) -> None:
        self.grid, self.device = grid, device
        self._members: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}

    def pool(self, mask: torch.Tensor, cells: tuple[int, ...]) -> torch.Tensor:
        key = (*mask.shape[1:], *cells)
        if key not in self._members:
            self._members[key] = tuple(
                torch.from_numpy(self.grid.membership(a, n_cells, n_in).astype(np.float32)).to(self.device)
                for a, (n_cells, n_in) in enumerate(zip(cells, mask.shape[1:])))
        mt, mh, mw = self._members[key]
        return torch.einsum("ntyx,at,by,cx->nabc", mask.float(), mt, mh, mw) > 0


class StudyLabelHead(torch.nn.Module):
    """Phase-1 training wrapper: the window model plus a linear head from its pooled features to the
    nine study labels (`phase1.study_label_weight` > 0). `forward(x)` is the window model's output,
    so validation and feature extraction see the plain model; `forward(x, with_study=True)` also
    returns the study-label logits (B, 9). Only the window model is kept after phase 1."""

    def __init__(self, model: torch.nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.model = model
        self.head = torch.nn.Linear(feature_dim, len(STUDY_LABELS))

    def forward(self, x: torch.Tensor, with_study: bool = False) -> WindowOutput | tuple[WindowOutput, torch.Tensor]:
        out = self.model(x)
        return (out, self.head(out.features)) if with_study else out


def _loader(ds: Dataset[Any], batch_size: int, workers: int, *, sampler: Sampler[int] | None = None,
            seed: int = 0) -> DataLoader[Any]:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      worker_init_fn=seed_worker, generator=g, pin_memory=False, drop_last=False)


@torch.no_grad()
def predict_windows(model: torch.nn.Module, ds: WindowDataset, ctx: DistContext, *, batch_size: int, workers: int,
                    amp: bool, progress: bool = False, want_features: bool = False,
                    desc: str = "validate") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sharded inference over `ds` (eval mode); returns (probs, losses, features|None) in dataset order."""
    from tqdm import tqdm

    model.eval()
    idx = shard(list(range(len(ds))), ctx)
    loader = _loader(Subset(ds, idx), batch_size, workers)
    probs: list[np.ndarray] = []
    losses: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main)):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device)
        with autocast_for(ctx.device, amp):
            out = model(x)
        logit = out.logit.float()
        probs.append(torch.sigmoid(logit).cpu().numpy())
        losses.append(F.binary_cross_entropy_with_logits(logit, y.float(), reduction="none").cpu().numpy())
        if want_features:
            feats.append(out.features.float().cpu().numpy())
    local = (idx, np.concatenate(probs) if probs else np.zeros(0), np.concatenate(losses) if losses else np.zeros(0),
             np.concatenate(feats) if feats else None)
    parts = gather(local, ctx)
    n = len(ds)
    p_all, l_all = np.zeros(n, np.float64), np.zeros(n, np.float64)
    f_all: np.ndarray | None = None
    for i, p, ls, f in parts:
        p_all[i], l_all[i] = p, ls
        if f is not None and len(i):
            if f_all is None:
                f_all = np.zeros((n, f.shape[1]), np.float32)
            f_all[i] = f
    return p_all, l_all, f_all


def study_max_auroc(ds: WindowDataset, probs: np.ndarray) -> float:
    """AUROC of each study's highest window probability against "the study has a positive window"
    (how the node flags a study); NaN when one class is missing. `ds.index` lists (study, window)."""
    uids = [uid for uid, _ in ds.index]
    starts = [i for i in range(1, len(uids)) if uids[i] != uids[i - 1]]  # the index groups a study's windows
    return auroc(*study_maxima(np.split(np.asarray(ds.labels), starts), np.split(np.asarray(probs), starts)))


def _selection(criterion: str, metrics: dict[str, Any]) -> float:
    return metrics["val_auroc"] if criterion == "val_auroc" else -metrics["val_loss"]


def train_phase1(config: TrainConfig, run_dir: str | os.PathLike[str], ctx: DistContext | None = None, *,
                 resume: bool = True, progress: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Train phase 1 (resuming from RUN/phase1/last.pt when `resume`); return the best epoch's metrics."""
    ctx = ctx or setup(config.device)
    run = Path(run_dir)
    out_dir = run / "phase1"
    p1, pp = config.phase1, config.preprocess
    make_deterministic(config.seed, ctx.device)
    if p1.batch_size % ctx.world_size:
        raise ValueError(f"phase1.batch_size {p1.batch_size} is not divisible by {ctx.world_size} processes; "
                         f"the global batch is split evenly, choose a multiple of {ctx.world_size}")
    per_rank = p1.batch_size // ctx.world_size
    split = load_split(run / "split.json")
    with_study = p1.study_label_weight > 0
    with_attention = p1.attention_loss_weight > 0
    train_ds = WindowDataset(load_cache_index(run, split.train), pp.crop, augment=True, seed=config.seed,
                             max_rotation_deg=p1.rotation_deg, random_crop=p1.random_crop, study_labels=with_study,
                             masks=with_attention)
    if with_attention and ctx.is_main:
        log.info("phase1_attention_masks", studies_with_masks=train_ds.studies_with_masks,
                 training_studies=len(train_ds.entries), weight=p1.attention_loss_weight)
        if not train_ds.studies_with_masks:
            log.warning("phase1_attention_without_masks", weight=p1.attention_loss_weight,
                        fix="no training study has DATA/masks/<study>.npz (docs/training.md): the attention loss adds "
                            "nothing; set phase1.attention_loss_weight = 0 or add masks and rebuild the cache")
    val_ds = WindowDataset(load_cache_index(run, split.validation), pp.crop, augment=False)
    if len(train_ds) == 0:
        raise ValueError(f"{run}: no training windows in the cache; run `dicom-node-train cache` first")
    if p1.keep == "last":
        criterion = "last"
    else:
        criterion = "val_auroc" if np.unique(val_ds.labels).size == 2 else "val_loss"

    model = r3d_18(num_outputs=1, width=p1.width, pretrained=p1.pretrained).to(ctx.device)
    cells = AttentionCells(cam_grid(model), ctx.device) if with_attention else None
    channels_last = ctx.device.type == "cpu"  # ~10 % faster 3D convolutions on CPU (oneDNN); still deterministic
    if channels_last:
        # torch's stubs lack Module.to(memory_format=...), which torch documents and accepts
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    net: torch.nn.Module = StudyLabelHead(model, p1.feature_dim).to(ctx.device) if with_study else model  # what trains
    optimizer = torch.optim.Adam(net.parameters(), lr=p1.lr)
    use_amp = bool(config.amp and ctx.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    fresh: dict[str, Any] = {"epoch": None, "value": -math.inf, "criterion": criterion}
    last_path = out_dir / "last.pt"
    history: list[dict[str, Any]] = []
    start_epoch, step, best = 0, 0, fresh
    if resume:
        stateful: dict[str, Any] = {"model": model, "optimizer": optimizer, "scaler": scaler}
        if with_study:
            stateful["study_head"] = net.head
        start_epoch, step, history, best = resume_state(last_path, stateful, fresh)
        if ctx.is_main and start_epoch:
            log.info("phase1_resumed", from_epoch=start_epoch, step=step)
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    sampler: DistributedSampler[Any] | BalancedSampler
    if p1.positive_fraction is None and p1.windows_per_epoch is None:
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed)
    else:
        sampler = BalancedSampler(train_ds.labels, p1.positive_fraction, num_samples=p1.windows_per_epoch,
                                  rank=ctx.rank, world_size=ctx.world_size, seed=config.seed,
                                  levels=train_ds.levels, level_matched=p1.level_matched_negatives)

    from tqdm import tqdm

    for epoch in range(start_epoch, p1.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(config.seed + 1000 * epoch)  # resume-stable
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        loader = _loader(train_ds, per_rank, config.num_workers, sampler=sampler, seed=config.seed + epoch)
        net.train()
        loss_sum, study_loss_sum, attention_loss_sum, seen = 0.0, 0.0, 0.0, 0
        dead_cams, supervised_windows = 0, 0
        bar = tqdm(loader, desc=f"phase1 epoch {epoch + 1}/{p1.epochs}", disable=not (progress and ctx.is_main))
        for batch in bar:
            x, y = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(p1, step, len(loader))
            with autocast_for(ctx.device, config.amp):
                out = net(x, with_study=True) if with_study else net(x)
            window_out = out[0] if with_study else out
            loss = F.binary_cross_entropy_with_logits(window_out.logit.float(), y.float())
            if with_study:
                study_loss = F.binary_cross_entropy_with_logits(out[1].float(), batch[2].to(ctx.device))
                study_loss_sum += study_loss.detach().item() * len(y)
                loss = loss + p1.study_label_weight * study_loss
            if cells is not None:
                # the CAM the node will draw (GAP -> linear head), kept in the graph, against the clot's cells
                heat = cam(window_out.activations.float(), model.fc.weight[0].float())
                target = cells.pool(batch[-2].to(ctx.device), tuple(heat.shape[1:]))
                known = batch[-1].to(ctx.device)
                if not p1.attention_on_negatives:  # see Phase1Config.attention_on_negatives
                    known = known * target.flatten(1).any(dim=1)
                attention_loss = attention_dice_loss(heat, target, known)
                attention_loss_sum += attention_loss.detach().item() * len(y)
                # a CAM that is zero everywhere on a window with embolus cells gets no gradient from the loss:
                # counted so that a collapse shows in the history instead of in the node's empty heatmaps
                supervised = known.bool() & target.flatten(1).any(dim=1)
                dead_cams += int((heat.detach().flatten(1).amax(dim=1)[supervised] <= 0).sum())
                supervised_windows += int(supervised.sum())
                loss = loss + p1.attention_loss_weight * attention_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_sum += loss.detach().item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}")
            if max_steps is not None and step >= max_steps:
                break
        train_seconds = time.perf_counter() - t0
        seen_all = sum(gather(seen, ctx))
        train_loss = sum(gather(loss_sum, ctx)) / max(seen_all, 1)
        probs, losses, _ = predict_windows(net, val_ds, ctx, batch_size=per_rank * 2, workers=config.num_workers,
                                           amp=config.amp, progress=progress)
        metrics: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                   "val_loss": float(losses.mean()) if len(losses) else float("nan"),
                   "val_auroc": auroc(val_ds.labels, probs), "val_study_auroc": study_max_auroc(val_ds, probs),
                   "seconds": round(time.perf_counter() - t0, 2), "train_seconds": round(train_seconds, 2),
                   "train_windows_per_s": round(seen_all / max(train_seconds, 1e-9), 2),
                   "train_windows": len(train_ds), "val_windows": len(val_ds)}
        if with_study:  # the total train_loss includes study_label_weight x this
            metrics["train_study_loss"] = sum(gather(study_loss_sum, ctx)) / max(seen_all, 1)
        if cells is not None:  # ... and attention_loss_weight x this
            metrics["train_attention_loss"] = sum(gather(attention_loss_sum, ctx)) / max(seen_all, 1)
            supervised_all = sum(gather(supervised_windows, ctx))
            metrics["train_dead_cam_share"] = sum(gather(dead_cams, ctx)) / max(supervised_all, 1)
            if ctx.is_main and supervised_all and metrics["train_dead_cam_share"] > 0.5:
                log.warning("phase1_cam_dead", epoch=epoch, share=round(metrics["train_dead_cam_share"], 3),
                            fix="the CAM is zero on most embolus windows, so the attention loss cannot move it and the "
                                "node's heatmaps will be empty; keep phase1.attention_on_negatives = false, lower "
                                "phase1.attention_loss_weight or the learning rate")
        history.append(metrics)
        # keep = "last": every epoch replaces the kept model; its value is then the epoch's validation AUROC
        improved = criterion == "last" or best["epoch"] is None or _selection(criterion, metrics) > best["value"]
        if improved:
            value = metrics["val_auroc"] if criterion == "last" else _selection(criterion, metrics)
            best = {"epoch": epoch, "value": value, "criterion": criterion}
        if ctx.is_main:
            payload = {"phase": 1, "epoch": epoch, "step": step, "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "config": config_to_dict(config), "metrics": metrics, "history": history, "best": best,
                       "git_revision": git_revision(), "world_size": ctx.world_size}
            if with_study:
                payload["study_head"] = cast(StudyLabelHead, _unwrap(net)).head.state_dict()
            if improved:
                save_checkpoint(out_dir / "best.pt", payload)
            save_checkpoint(last_path, payload)
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
            log.info("epoch_finished", phase=1, epoch=epoch, loss=round(train_loss, 5), val_loss=round(metrics["val_loss"], 5),
                     auroc=metrics["val_auroc"], study_auroc=metrics["val_study_auroc"], seconds=metrics["seconds"], best_epoch=best["epoch"])
        if max_steps is not None and step >= max_steps:
            break
    if ctx.is_main:
        (out_dir / "done.json").write_text(json.dumps({"best": best, "epochs": p1.epochs, "step": step}, indent=1))
    return {"best": best, "history": history}


def extract_features(config: TrainConfig, run_dir: str | os.PathLike[str], ctx: DistContext | None = None, *,
                     progress: bool = True) -> dict[str, Any]:
    """Best phase-1 model -> RUN/features/<study>.npy (N, F) and <study>.probs.npy (N,) for every split."""
    from tqdm import tqdm

    ctx = ctx or setup(config.device)
    run = Path(run_dir)
    feat_dir = run / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(run / "phase1" / "best.pt")
    model = r3d_18(num_outputs=1, width=config.phase1.width).to(ctx.device)
    model.load_state_dict(ck["model"])
    model.eval()
    split = load_split(run / "split.json")
    uids = sorted({*split.train, *split.validation, *split.test})
    entries = load_cache_index(run, uids)
    todo = [u for u in entries if not ((feat_dir / f"{u}.npy").is_file() and (feat_dir / f"{u}.probs.npy").is_file())]
    mine = shard(todo, ctx)
    t0 = time.perf_counter()
    n_windows = 0
    batch = max(1, config.phase1.batch_size // ctx.world_size) * 2
    local = replace(ctx, rank=0, world_size=1)  # each process handles whole studies of its own
    for uid in tqdm(mine, desc="features", unit="study", disable=not (progress and ctx.is_main)):
        ds = WindowDataset({uid: entries[uid]}, config.preprocess.crop, augment=False)
        probs, _, feats = predict_windows(model, ds, local, batch_size=batch, workers=0, amp=config.amp, want_features=True)
        # want_features: an array whenever the study has windows (every cached study has at least one)
        np.save(feat_dir / f"{uid}.npy", cast(np.ndarray, feats).astype(np.float32))
        np.save(feat_dir / f"{uid}.probs.npy", probs.astype(np.float32))
        n_windows += len(ds)
    counts = gather(n_windows, ctx)
    summary = {"studies": len(entries), "extracted": len(todo), "windows": int(sum(counts)),
               "feature_dim": config.phase1.feature_dim, "phase1_epoch": ck["epoch"],
               "seconds": round(time.perf_counter() - t0, 2)}
    if ctx.is_main:
        (feat_dir / "done.json").write_text(json.dumps(summary, indent=1))
        log.info("features_extracted", **summary)
    return summary
