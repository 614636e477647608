"""The Shi et al. 2020 family's training steps: stage I (slab ResNet-18 + attention loss), stage-I features,
stage II (bidirectional Conv-LSTM), evaluation. `dicom_node_training.fit` runs them in place of the Ma family's
phase1 / features / phase2 / evaluate for a ``family = "shi2020"`` config; the cache step is shared (the
preprocessing's slabs give each study a (50, 1, 5, R, R) cache entry labelled by the slabs' central slices).

Read top to bottom:

* `train_stage1`: each epoch every positive training slab (central slice with PE) and
  `shi1.negatives_per_positive` times as many slabs drawn from studies without PE (the paper: an equal
  number). Loss L = BCE + lambda * continuous Dice (`loss.attention_dice_loss`, the one implementation both
  families use) between the Grad-CAM map, computed by autograd with ``create_graph=True`` from layer4 (eq. 1-2),
  and the central slice's embolus mask pooled to the map's cells with the network's own cell centres; a slab
  whose central slice was not annotated adds no attention loss. The epoch with the best validation accuracy on
  a balanced validation set (every positive slab, as many negatives, fixed draw) is kept (ties: lower loss).
* `extract_features`: best stage I -> RUN/features/<study>.npy (50, F, h, w) float16 layer4 maps (the stage-II
  input; float16 halves 29 MB a study at 384 px), <study>.probs.npy (50,) slab probabilities, <study>.cam.npy
  (50, h, w) the attention maps (localisation benchmark).
* `train_stage2`: Conv-LSTM over the 50 maps, BCE on "PE present" (the study's RSNA label: not negative and
  not indeterminate), best validation accuracy kept (ties: lower loss).
* `evaluate_run`: report.json in the Ma family's shape (test / validation / thresholds / threshold_rule /
  notes / settings) for the one label the family predicts, ``pe_present_on_window`` (the study has PE),
  plus the slab-level AUROC of stage I; report.md; roc_test.png.

Every training step resumes from its last.pt (every epoch) and writes done.json when finished.
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
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL
from dicom_node.log import get_logger
from dicom_node_training.checkpoint import git_revision, load_checkpoint, resume_state, save_checkpoint
from dicom_node_training.config import TrainConfig, config_to_dict
from dicom_node_training.data import CacheEntry, WindowDataset, load_cache_index, load_split
from dicom_node_training.distributed import resolve_device
from dicom_node_training.evaluate import (
    THRESHOLD_RULE,
    auroc,
    auroc_ci_bootstrap,
    auroc_ci_delong,
    json_safe,
    sensitivity_specificity,
    youden_threshold,
)
from dicom_node_training.loss import attention_dice_loss
from dicom_node_training.models.convlstm import ConvLSTMNet, conv_lstm_net
from dicom_node_training.models.resnet2d import ResNet2d, cam_grid_2d, grad_cam, resnet18_slab, slab_cam
from dicom_node_training.phase1 import AttentionCells, make_deterministic

__all__ = ["study_pe_label", "build_stage1", "build_stage2", "train_stage1", "extract_features", "train_stage2",
           "evaluate_run", "predict_studies"]

log = get_logger("dicom_node_training.shi")

_NEGATIVE = STUDY_LABELS.index("negative_exam_for_pe")
_INDETERMINATE = STUDY_LABELS.index("indeterminate")


def study_pe_label(entry: CacheEntry) -> int:
    """1 when the study has PE (RSNA: neither a negative exam nor indeterminate)."""
    return int(entry.study_labels[_NEGATIVE] < 0.5 and entry.study_labels[_INDETERMINATE] < 0.5)


def build_stage1(config: TrainConfig, pretrained: bool = True) -> ResNet2d:
    s1, pp = config.shi1, config.preprocess
    return resnet18_slab(in_channels=pp.channels * pp.window_slices, width=s1.width, layer4_stride=s1.layer4_stride,
                         layer3_stride=s1.layer3_stride, pretrained=s1.pretrained if pretrained else None)


def stage1_cells(config: TrainConfig) -> tuple[int, int]:
    """(h, w) of the stage-I maps at the preprocessing's crop."""
    model = build_stage1(config, pretrained=False).eval()
    with torch.no_grad():
        a = model(torch.zeros(1, config.preprocess.channels, config.preprocess.window_slices,
                              config.preprocess.crop, config.preprocess.crop)).activations
    return int(a.shape[-2]), int(a.shape[-1])


def build_stage2(config: TrainConfig) -> ConvLSTMNet:
    s2 = config.shi2
    return conv_lstm_net(config.shi1.width * 8, stage1_cells(config), filters=s2.filters, units=s2.units,
                         input_dropout=s2.input_dropout, dropout=s2.dropout)


def _mask_cells(model: ResNet2d, slices: int) -> AttentionCells:
    """Pools the central slice's mask (B, 1, H, W) to layer4's cells: the in-plane grid of the network."""
    g = cam_grid_2d(model, slices)
    return AttentionCells(CamGrid(stride=(1.0, g.stride[1], g.stride[2]), offset=(0.0, g.offset[1], g.offset[2])),
                          torch.device("cpu"))


def _balanced(ds: WindowDataset, negatives_from: set[str], ratio: float, rng: np.random.Generator) -> list[int]:
    """Every positive slab and round(ratio x as many) slabs drawn without replacement from PE-free studies."""
    pos = [i for i, lab in enumerate(ds.labels) if lab > 0.5]
    neg = [i for i, (u, _) in enumerate(ds.index) if u in negatives_from]
    n_neg = min(len(neg), max(1, int(round(ratio * max(len(pos), 1)))))
    return sorted(pos + [int(i) for i in rng.choice(neg, size=n_neg, replace=False)]) if neg else pos


def _loader(ds: Dataset[Any], idx: list[int], batch: int, shuffle_seed: int | None) -> DataLoader[Any]:
    order = list(idx)
    if shuffle_seed is not None:
        order = [order[i] for i in np.random.default_rng(shuffle_seed).permutation(len(order))]
    return DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch, shuffle=False, num_workers=0)


def train_stage1(config: TrainConfig, run_dir: str | os.PathLike[str], *, progress: bool = True,
                 max_steps: int | None = None) -> dict[str, Any]:
    """Train stage I (resuming from RUN/phase1/last.pt); return the kept epoch and the history."""
    from tqdm import tqdm

    run, s1, pp = Path(run_dir), config.shi1, config.preprocess
    out_dir = run / "phase1"
    device = resolve_device(config.device)
    make_deterministic(config.seed, device)
    split = load_split(run / "split.json")
    train_entries = load_cache_index(run, split.train)
    val_entries = load_cache_index(run, split.validation)
    attention = s1.attention_loss_weight > 0
    train_ds = WindowDataset(train_entries, pp.crop, augment=True, seed=config.seed, max_rotation_deg=0.0, masks=attention)
    val_ds = WindowDataset(val_entries, pp.crop, augment=False)
    free = {u for u, e in train_entries.items() if not study_pe_label(e)}
    val_idx = _balanced(val_ds, {u for u, e in val_entries.items() if not study_pe_label(e)}, 1.0,
                        np.random.default_rng(config.seed))
    if not any(train_ds.labels > 0.5):
        raise ValueError(f"{run}: no positive training slab in the cache (central slice with PE); stage I needs "
                         "positive studies with slice labels")
    model = build_stage1(config).to(device)
    cells = _mask_cells(model, pp.window_slices) if attention else None
    optimizer = torch.optim.Adam(model.parameters(), lr=s1.lr)
    fresh: dict[str, Any] = {"epoch": None, "value": -math.inf, "criterion": "val_accuracy"}
    start, step, history, best = resume_state(out_dir / "last.pt", {"model": model, "optimizer": optimizer}, fresh)
    mid = pp.window_slices // 2
    for epoch in range(start, s1.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(config.seed + 1000 * epoch)
        train_ds.set_epoch(epoch)
        idx = _balanced(train_ds, free, s1.negatives_per_positive, np.random.default_rng((config.seed, epoch)))
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "attention": 0.0}
        seen = 0
        loader = _loader(train_ds, idx, s1.batch_size, shuffle_seed=config.seed + epoch)
        for batch in tqdm(loader, desc=f"stage I epoch {epoch + 1}/{s1.epochs}", disable=not progress):
            x, y = batch[0].to(device), batch[1].to(device)
            out = model(x)
            ce = F.binary_cross_entropy_with_logits(out.logit, y.float())
            loss = ce
            if cells is not None:
                heat = grad_cam(out, create_graph=True)  # (B, 1, h, w), differentiable: eq. 1-2 by autograd
                target = cells.pool(batch[2][:, mid:mid + 1].to(device), tuple(heat.shape[1:]))
                att = attention_dice_loss(heat, target, batch[3].to(device))
                loss = ce + s1.attention_loss_weight * att
                sums["attention"] += att.item() * len(y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            sums["loss"] += loss.item() * len(y)
            sums["ce"] += ce.item() * len(y)
            seen += len(y)
            if max_steps is not None and step >= max_steps:
                break
        probs = _slab_probs(model, val_ds, val_idx, device, s1.batch_size)
        y_val = val_ds.labels[val_idx]
        val_loss = float(F.binary_cross_entropy(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6),
                                                torch.from_numpy(y_val)).item()) if len(probs) else math.nan
        metrics = {"epoch": epoch, "step": step, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                   "val_accuracy": float(np.mean((probs >= 0.5) == (y_val > 0.5))) if len(probs) else math.nan,
                   "val_auroc": auroc(y_val, probs), "val_loss": val_loss, "train_slabs": seen,
                   "val_slabs": len(val_idx), "seconds": round(time.perf_counter() - t0, 2)}
        history.append(metrics)
        value = metrics["val_accuracy"] - 1e-6 * val_loss  # best accuracy; among equal ones the lower loss
        improved = best["epoch"] is None or value > best["value"]
        if improved:
            best = {"epoch": epoch, "value": value, "criterion": "val_accuracy"}
        payload = {"phase": 1, "family": "shi2020", "epoch": epoch, "step": step, "model": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "config": config_to_dict(config), "metrics": metrics,
                   "history": history, "best": best, "git_revision": git_revision(), "world_size": 1}
        if improved:
            save_checkpoint(out_dir / "best.pt", payload)
        save_checkpoint(out_dir / "last.pt", payload)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        log.info("epoch_finished", phase="shi_stage1", epoch=epoch, loss=round(metrics["train_loss"], 5),
                 attention_loss=round(metrics["train_attention"], 5), val_accuracy=metrics["val_accuracy"],
                 val_auroc=metrics["val_auroc"], best_epoch=best["epoch"], seconds=metrics["seconds"])
        if max_steps is not None and step >= max_steps:
            break
    (out_dir / "done.json").write_text(json.dumps({"best": best, "epochs": s1.epochs, "step": step}, indent=1))
    return {"best": best, "history": history}


@torch.no_grad()
def _slab_probs(model: ResNet2d, ds: WindowDataset, idx: list[int], device: torch.device, batch: int) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(b[0].to(device)).logit).cpu() for b in _loader(ds, idx, batch, None)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def extract_features(config: TrainConfig, run_dir: str | os.PathLike[str], *, progress: bool = True) -> dict[str, Any]:
    """Best stage I -> RUN/features/<study>.npy (50, F, h, w) float16, .probs.npy (50,), .cam.npy (50, h, w)."""
    from tqdm import tqdm

    run = Path(run_dir)
    feat_dir = run / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    ck = load_checkpoint(run / "phase1" / "best.pt")
    model = build_stage1(config, pretrained=False).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    split = load_split(run / "split.json")
    entries = load_cache_index(run, sorted({*split.train, *split.validation, *split.test}))
    t0 = time.perf_counter()
    todo = [u for u in entries if not (feat_dir / f"{u}.cam.npy").is_file()]
    for uid in tqdm(todo, desc="features", unit="study", disable=not progress):
        ds = WindowDataset({uid: entries[uid]}, config.preprocess.crop, augment=False)
        feats, probs, cams = [], [], []
        with torch.no_grad():
            for b in _loader(ds, list(range(len(ds))), 2 * config.shi1.batch_size, None):
                out = model(b[0].to(device))
                feats.append(out.activations[:, :, 0].cpu().half())
                probs.append(torch.sigmoid(out.logit).cpu())
                cams.append(slab_cam(model, out)[:, 0].cpu())
        np.save(feat_dir / f"{uid}.npy", torch.cat(feats).numpy())
        np.save(feat_dir / f"{uid}.probs.npy", torch.cat(probs).numpy().astype(np.float32))
        np.save(feat_dir / f"{uid}.cam.npy", torch.cat(cams).numpy().astype(np.float32))  # written last: marks done
    summary = {"studies": len(entries), "extracted": len(todo), "feature_shape": list(np.load(
        feat_dir / f"{next(iter(entries))}.npy", mmap_mode="r").shape[1:]) if entries else [],
        "phase1_epoch": ck["epoch"], "seconds": round(time.perf_counter() - t0, 2)}
    (feat_dir / "done.json").write_text(json.dumps(summary, indent=1))
    log.info("features_extracted", family="shi2020", **summary)
    return summary


class _Studies(Dataset):
    """One item = (a study's (50, F, h, w) float32 maps, its PE label)."""

    def __init__(self, feat_dir: Path, entries: dict[str, CacheEntry]) -> None:
        self.feat_dir, self.entries, self.uids = feat_dir, entries, sorted(entries)

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        uid = self.uids[i]
        x = torch.from_numpy(np.load(self.feat_dir / f"{uid}.npy").astype(np.float32))
        return x, torch.tensor(float(study_pe_label(self.entries[uid])))


@torch.no_grad()
def predict_studies(model: ConvLSTMNet, ds: _Studies, device: torch.device, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of every study of `ds`, in its order."""
    model.eval()
    p, y = [], []
    for x, lab in DataLoader(ds, batch_size=batch, shuffle=False):
        p.append(torch.sigmoid(model(x.to(device))).cpu())
        y.append(lab)
    if not p:
        return np.zeros(0), np.zeros(0)
    return torch.cat(p).numpy().astype(np.float64), torch.cat(y).numpy().astype(np.float64)


def train_stage2(config: TrainConfig, run_dir: str | os.PathLike[str], *, progress: bool = True,
                 max_steps: int | None = None) -> dict[str, Any]:
    """Train stage II on the cached features (resuming from RUN/phase2/last.pt)."""
    from tqdm import tqdm

    run, s2 = Path(run_dir), config.shi2
    out_dir = run / "phase2"
    device = resolve_device(config.device)
    make_deterministic(config.seed, device)
    split = load_split(run / "split.json")
    train_ds = _Studies(run / "features", load_cache_index(run, split.train))
    val_ds = _Studies(run / "features", load_cache_index(run, split.validation))
    model = build_stage2(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=s2.lr)
    fresh: dict[str, Any] = {"epoch": None, "value": -math.inf, "criterion": "val_accuracy"}
    start, step, history, best = resume_state(out_dir / "last.pt", {"model": model, "optimizer": optimizer}, fresh)
    for epoch in range(start, s2.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(config.seed + 1000 * epoch)
        model.train()
        loss_sum, seen = 0.0, 0
        loader = _loader(train_ds, list(range(len(train_ds))), s2.batch_size, shuffle_seed=config.seed + epoch)
        for x, y in tqdm(loader, desc=f"stage II epoch {epoch + 1}/{s2.epochs}", disable=not progress):
            loss = F.binary_cross_entropy_with_logits(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            seen += len(y)
            if max_steps is not None and step >= max_steps:
                break
        p, y_val = predict_studies(model, val_ds, device, 2 * s2.batch_size)
        val_loss = float(F.binary_cross_entropy(torch.from_numpy(p).clamp(1e-6, 1 - 1e-6),
                                                torch.from_numpy(y_val)).item()) if len(p) else math.nan
        metrics = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(seen, 1), "val_loss": val_loss,
                   "val_accuracy": float(np.mean((p >= 0.5) == (y_val > 0.5))) if len(p) else math.nan,
                   "val_auroc": auroc(y_val, p), "seconds": round(time.perf_counter() - t0, 2)}
        history.append(metrics)
        value = metrics["val_accuracy"] - 1e-6 * val_loss
        improved = best["epoch"] is None or value > best["value"]
        if improved:
            best = {"epoch": epoch, "value": value, "criterion": "val_accuracy"}
        payload = {"phase": 2, "family": "shi2020", "epoch": epoch, "step": step, "model": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "config": config_to_dict(config), "metrics": metrics,
                   "history": history, "best": best, "git_revision": git_revision(), "in_hw": list(model.in_hw)}
        if improved:
            save_checkpoint(out_dir / "best.pt", payload)
        save_checkpoint(out_dir / "last.pt", payload)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        log.info("epoch_finished", phase="shi_stage2", epoch=epoch, loss=round(metrics["train_loss"], 5),
                 val_accuracy=metrics["val_accuracy"], val_auroc=metrics["val_auroc"], best_epoch=best["epoch"])
        if max_steps is not None and step >= max_steps:
            break
    (out_dir / "done.json").write_text(json.dumps({"best": best, "epochs": s2.epochs, "step": step}, indent=1))
    return {"best": best, "history": history}


def _figures(y: np.ndarray, p: np.ndarray, seed: int) -> dict[str, Any]:
    return {"auroc": auroc(y, p), "auroc_ci": list(auroc_ci_bootstrap(y, p, 1000, seed)),
            "auroc_ci_delong": list(auroc_ci_delong(y, p)), "positives": int((y > 0.5).sum()),
            "negatives": int((y <= 0.5).sum())}


def evaluate_run(config: TrainConfig, run_dir: str | os.PathLike[str], *, progress: bool = True) -> dict[str, Any]:
    """Best stage II on validation and test -> RUN/report.json, report.md, roc_test.png (module docstring)."""
    run = Path(run_dir)
    device = resolve_device(config.device)
    model = build_stage2(config).to(device)
    ck = load_checkpoint(run / "phase2" / "best.pt")
    model.load_state_dict(ck["model"])
    split = load_split(run / "split.json")
    out: dict[str, Any] = {}
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    notes: list[str] = []
    for name, uids in (("validation", split.validation), ("test", split.test)):
        entries = load_cache_index(run, uids)
        p, y = predict_studies(model, _Studies(run / "features", entries), device, 2 * config.shi2.batch_size)
        preds[name] = (y, p)
        slab_y = np.concatenate([e.window_labels for e in entries.values()]) if entries else np.zeros(0)
        slab_p = np.concatenate([np.load(run / "features" / f"{u}.probs.npy") for u in entries]) if entries else np.zeros(0)
        fig = _figures(y, p, config.seed)
        out[name] = {k: {WINDOW_LABEL: v} for k, v in fig.items()}
        out[name].update(n_studies=len(entries), n_windows=int(slab_y.size),
                         slab_auroc=auroc(slab_y, slab_p), stage1_slab_auroc_definition=(
                             "stage-I slab probability against the label of the slab's central slice, all slabs pooled"))
        if math.isnan(fig["auroc"]):
            notes.append(f"{name}: {WINDOW_LABEL} has one class; AUROC undefined")
    threshold = youden_threshold(*preds["validation"])
    sens, spec = sensitivity_specificity(*preds["test"], threshold)
    out["test"]["sensitivity"], out["test"]["specificity"] = {WINDOW_LABEL: sens}, {WINDOW_LABEL: spec}
    report = {"family": "shi2020", "labels": [WINDOW_LABEL], "test": out["test"], "validation": out["validation"],
              "thresholds": {WINDOW_LABEL: threshold}, "threshold_rule": THRESHOLD_RULE, "consistency": {},
              "notes": notes + [f"{WINDOW_LABEL} is the study's PE-present probability of stage II (Conv-LSTM); "
                                "the family predicts no other label"],
              "settings": {"bootstrap_resamples": 1000, "seed": config.seed, "ci_level": 0.95,
                           "auroc_ci": "stratified bootstrap, percentile",
                           "auroc_ci_delong": "DeLong 1988, normal approximation"},
              "phase1": load_checkpoint(run / "phase1" / "best.pt")["metrics"], "phase2": ck["metrics"]}
    (run / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    t = out["test"]
    (run / "report.md").write_text(
        f"# Shi et al. 2020 family: {run.name}\n\n| split | studies | study AUROC (95% CI) | slab AUROC |\n|---|---|---|---|\n"
        + "".join(f"| {n} | {out[n]['n_studies']} | {out[n]['auroc'][WINDOW_LABEL]} ({out[n]['auroc_ci'][WINDOW_LABEL]}) | "
                  f"{out[n]['slab_auroc']} |\n" for n in ("validation", "test"))
        + f"\nThreshold (validation, Youden): {threshold:.4f}; test sensitivity {t['sensitivity'][WINDOW_LABEL]}, "
          f"specificity {t['specificity'][WINDOW_LABEL]}\n")
    _plot_roc(*preds["test"], threshold, run / "roc_test.png")
    log.info("evaluation_finished", family="shi2020", test_auroc=t["auroc"][WINDOW_LABEL], threshold=threshold)
    return report


def _plot_roc(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    pos, neg = np.sort(p[y > 0.5]), np.sort(p[y <= 0.5])
    if pos.size and neg.size:
        cands = np.concatenate([[np.inf], np.unique(p)[::-1]])
        ax.plot(1 - np.searchsorted(neg, cands) / neg.size, 1 - np.searchsorted(pos, cands) / pos.size, lw=1.8)
        ax.plot([np.mean(neg >= threshold)], [np.mean(pos >= threshold)], "o", color="C3")
    ax.set_title(f"PE present (study), test\nAUROC {auroc(y, p):.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    fig.savefig(path, dpi=80)
    plt.close(fig)
