"""Evaluation in the paper's terms and beyond: AUROC with 95% CI, ROC plots, thresholds, consistency.

For the window label ``pe_present_on_window`` (all windows of all studies pooled) and each of
the nine study labels:

* AUROC (sklearn's ``roc_auc_score``, the Mann-Whitney statistic: ties count 1/2), 95% CI by
  stratified bootstrap (positives and negatives resampled separately, seeded, percentile interval)
  and, as in the paper, DeLong's CI (our own; sklearn has none);
* thresholds chosen on VALIDATION by maximising Youden's J = sensitivity + specificity - 1
  (ties -> the lowest such threshold, i.e. the higher sensitivity); a prediction is positive
  when ``p >= threshold``; sensitivity and specificity at that threshold on TEST;
* the competition's weighted log loss (:func:`dicom_node_training.loss.weighted_log_loss`);
* the share of test studies whose raw thresholded labels break the RSNA consistency rules,
  before and after :func:`dicom_node.labels.make_consistent`.

A label with a single class in a split gets AUROC ``NaN`` (``null`` in JSON) and a note.
Outputs: ``report.json``, ``report.md``, ``roc_test.png`` (and ``roc_validation.png``).
:func:`auroc` is the one AUROC of the training package (phase-1 validation uses it too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from dicom_node.labels import ALL_LABELS, STUDY_LABELS, WINDOW_LABEL, consistency_violations, make_consistent, sigmoid
from dicom_node.model.sequence import from_fixed_length
from dicom_node_training.loss import weighted_log_loss

__all__ = [
    "SplitPredictions",
    "Report",
    "auroc",
    "auroc_ci_bootstrap",
    "auroc_ci_delong",
    "youden_threshold",
    "study_maxima",
    "study_flag_arrays",
    "sensitivity_specificity",
    "consistency_shares",
    "evaluate",
    "write_report",
    "THRESHOLD_RULE",
    "json_safe",
]

THRESHOLD_RULE = (
    "maximise Youden's J (sensitivity + specificity - 1) on the validation split; ties -> lowest threshold; "
    "positive when p >= threshold. For pe_present_on_window the rule is applied at the study level "
    "(the highest window probability of a study against 'the study has a PE window'), because that is how "
    "the node uses it: a study is flagged when any window reaches the threshold"
)


@dataclass(frozen=True)
class SplitPredictions:
    """Probabilities and labels of one split. Window arrays are per study, in window order."""

    study_uids: tuple[str, ...]
    window_probs: tuple[np.ndarray, ...]  # per study (N_i,)
    window_labels: tuple[np.ndarray, ...]  # per study (N_i,) in {0, 1}
    study_probs: np.ndarray  # (S, 9) in STUDY_LABELS order
    study_labels: np.ndarray  # (S, 9)

    def __post_init__(self) -> None:
        s = len(self.study_uids)
        sp, sl = np.asarray(self.study_probs), np.asarray(self.study_labels)
        if sp.shape != (s, len(STUDY_LABELS)) or sl.shape != (s, len(STUDY_LABELS)):
            raise ValueError(
                f"SplitPredictions: {s} studies need study probs/labels of shape ({s}, {len(STUDY_LABELS)}), "
                f"got {sp.shape} and {sl.shape}"
            )
        if len(self.window_probs) != s or len(self.window_labels) != s:
            raise ValueError(f"SplitPredictions: {s} studies but {len(self.window_probs)} window prob arrays and {len(self.window_labels)} label arrays")
        for uid, p, y in zip(self.study_uids, self.window_probs, self.window_labels):
            if np.shape(p) != np.shape(y) or np.ndim(p) != 1:
                raise ValueError(f"SplitPredictions: study {uid} has window probs {np.shape(p)} and labels {np.shape(y)}; expected equal (N,) shapes")

    @classmethod
    def from_logits(
        cls,
        study_uids: Sequence[str],
        window_logits: np.ndarray,
        n_windows: Sequence[int],
        window_labels: Sequence[np.ndarray],
        study_logits: np.ndarray,
        study_labels: np.ndarray,
    ) -> SplitPredictions:
        """From stage-2 outputs on fixed-length sequences (S, L): logits mapped back to N_i windows, then sigmoid."""
        wl = np.asarray(window_logits, dtype=np.float64)
        probs = tuple(sigmoid(from_fixed_length(wl[i], int(n))) for i, n in enumerate(n_windows))
        return cls(
            study_uids=tuple(study_uids),
            window_probs=probs,
            window_labels=tuple(np.asarray(y).reshape(-1) for y in window_labels),
            study_probs=sigmoid(np.asarray(study_logits, dtype=np.float64)),
            study_labels=np.asarray(study_labels),
        )

    def label_arrays(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probs) of one label: pooled windows for the window label, one per study otherwise."""
        if label == WINDOW_LABEL:
            if not self.window_probs:
                return np.zeros(0), np.zeros(0)
            return (np.concatenate([np.asarray(y, dtype=np.float64) for y in self.window_labels]),
                    np.concatenate([np.asarray(p, dtype=np.float64) for p in self.window_probs]))
        k = STUDY_LABELS.index(label)
        return np.asarray(self.study_labels, dtype=np.float64)[:, k], np.asarray(self.study_probs, dtype=np.float64)[:, k]

    @property
    def n_windows(self) -> int:
        return int(sum(np.size(p) for p in self.window_probs))


def _split(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1) >= 0.5
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    return p[y], p[~y]


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve of scores `p` for labels `y` (positive when >= 0.5), by sklearn's
    ``roc_auc_score`` (ties count 1/2); NaN when only one class is present (or a score is NaN)."""
    from sklearn.metrics import roc_auc_score

    pos, neg = _split(y, p)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    scores = np.asarray(p, dtype=np.float64).reshape(-1)
    if np.isnan(scores).any():  # sklearn refuses NaN; the rank statistic used before gave NaN
        return math.nan
    return float(roc_auc_score(np.asarray(y).reshape(-1) >= 0.5, scores))


def auroc_ci_bootstrap(y: np.ndarray, p: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the AUROC from a stratified bootstrap (positives and negatives resampled separately)."""
    pos, neg = _split(y, p)
    if pos.size == 0 or neg.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    n = pos.size + neg.size
    chunk = max(1, int(4_000_000 // n))
    aucs: list[np.ndarray] = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        sample = np.concatenate([pos[rng.integers(0, pos.size, (r, pos.size))],
                                 neg[rng.integers(0, neg.size, (r, neg.size))]], axis=1)
        ranks = rankdata(sample, axis=1)
        aucs.append((ranks[:, : pos.size].sum(axis=1) - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))
    a = np.concatenate(aucs)
    tail = (1.0 - level) / 2.0
    return (float(np.quantile(a, tail)), float(np.quantile(a, 1.0 - tail)))


def auroc_ci_delong(y: np.ndarray, p: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """DeLong et al. (1988) CI of one AUROC (normal approximation, clipped to [0, 1]), as in the paper."""
    from scipy.stats import norm

    pos, neg = _split(y, p)
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        return (math.nan, math.nan)
    all_ranks = rankdata(np.concatenate([pos, neg]))
    v10 = (all_ranks[:m] - rankdata(pos)) / n  # per positive: share of negatives below it
    v01 = 1.0 - (all_ranks[m:] - rankdata(neg)) / m  # per negative: share of positives above it
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    half = float(norm.ppf(0.5 + level / 2.0)) * math.sqrt(max(var, 0.0))
    return (max(0.0, auc - half), min(1.0, auc + half))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising Youden's J on (y, p); ties -> the lowest threshold. 0.5 if one class only."""
    pos, neg = _split(y, p)
    if pos.size == 0 or neg.size == 0:
        return 0.5
    candidates = np.unique(np.concatenate([pos, neg]))  # ascending; positive when p >= t
    sens = 1.0 - np.searchsorted(np.sort(pos), candidates, side="left") / pos.size
    spec = np.searchsorted(np.sort(neg), candidates, side="left") / neg.size
    j = sens + spec - 1.0
    return float(candidates[int(np.flatnonzero(j >= j.max() - 1e-12)[0])])


def sensitivity_specificity(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``p >= threshold``; NaN where a class is absent."""
    pos, neg = _split(y, p)
    sens = float(np.mean(pos >= threshold)) if pos.size else math.nan
    spec = float(np.mean(neg < threshold)) if neg.size else math.nan
    return sens, spec


def study_maxima(window_labels: Sequence[np.ndarray], window_probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per study (one array of windows each): (1 if any window is PE-positive, the highest window probability)."""
    y = np.array([float(np.max(w) >= 0.5) if len(w) else 0.0 for w in window_labels])
    p = np.array([float(np.max(w)) if len(w) else 0.0 for w in window_probs])
    return y, p


def study_flag_arrays(pred: SplitPredictions) -> tuple[np.ndarray, np.ndarray]:
    """`study_maxima` of a split: how the node flags a study (highest window probability)."""
    return study_maxima(pred.window_labels, pred.window_probs)


def consistency_shares(pred: SplitPredictions, thresholds: dict[str, float]) -> tuple[float, float]:
    """Share of studies whose thresholded labels break the RSNA rules (before, after ``make_consistent``)."""
    if not pred.study_uids:
        return (math.nan, math.nan)
    before = after = 0
    for wp, sp in zip(pred.window_probs, np.asarray(pred.study_probs)):
        raw_windows = np.asarray(wp) >= thresholds.get(WINDOW_LABEL, 0.5)
        raw_study = {k: bool(sp[i] >= thresholds.get(k, 0.5)) for i, k in enumerate(STUDY_LABELS)}
        before += bool(consistency_violations(raw_windows, raw_study))
        fixed = make_consistent(wp, sp, thresholds)
        after += bool(consistency_violations(fixed.window_positive, fixed.study))
    s = len(pred.study_uids)
    return before / s, after / s


@dataclass(frozen=True)
class Report:
    """All figures of one evaluation; :meth:`to_dict` is the ``report.json`` content (NaN -> null)."""

    test: dict[str, Any]
    validation: dict[str, Any]
    thresholds: dict[str, float]
    consistency: dict[str, Any]
    notes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "test": self.test, "validation": self.validation, "thresholds": self.thresholds,
            "threshold_rule": THRESHOLD_RULE, "consistency": self.consistency,
            "notes": list(self.notes), "settings": self.settings,
        })


def json_safe(obj: Any) -> Any:
    """`obj` with NaN -> None and numpy scalars -> Python numbers (report.json allows no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _split_metrics(pred: SplitPredictions, name: str, n_resamples: int, seed: int, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: {} for k in ("auroc", "auroc_ci", "auroc_ci_delong", "positives", "negatives")}
    for i, label in enumerate(ALL_LABELS):
        y, p = pred.label_arrays(label)
        n_pos = int((y >= 0.5).sum())
        out["positives"][label] = n_pos
        out["negatives"][label] = int(y.size - n_pos)
        a = auroc(y, p)
        if math.isnan(a):
            notes.append(f"{name}: {label} has only one class ({n_pos} positive of {y.size}); AUROC undefined")
        out["auroc"][label] = a
        out["auroc_ci"][label] = list(auroc_ci_bootstrap(y, p, n_resamples, seed + i))
        out["auroc_ci_delong"][label] = list(auroc_ci_delong(y, p))
    out["weighted_log_loss"] = weighted_log_loss(pred.window_probs, pred.window_labels, pred.study_probs, pred.study_labels) if pred.study_uids else math.nan
    out["n_studies"] = len(pred.study_uids)
    out["n_windows"] = pred.n_windows
    return out


def evaluate(validation: SplitPredictions, test: SplitPredictions, n_resamples: int = 1000, seed: int = 0) -> Report:
    """Compute every figure; thresholds come from ``validation`` only."""
    notes: list[str] = []
    val = _split_metrics(validation, "validation", n_resamples, seed, notes)
    tst = _split_metrics(test, "test", n_resamples, seed, notes)
    thresholds: dict[str, float] = {}
    tst["sensitivity"], tst["specificity"] = {}, {}
    for label in ALL_LABELS:
        y_val, p_val = validation.label_arrays(label)
        if math.isnan(auroc(y_val, p_val)):
            notes.append(f"validation: {label} has one class; threshold defaults to 0.5")
        # the window label's threshold decides whether a study is flagged: choose it per study
        thresholds[label] = youden_threshold(*(study_flag_arrays(validation) if label == WINDOW_LABEL
                                               else (y_val, p_val)))
        sens, spec = sensitivity_specificity(*test.label_arrays(label), thresholds[label])
        tst["sensitivity"][label], tst["specificity"][label] = sens, spec
    y_flag, p_flag = study_flag_arrays(test)
    flag_sens, flag_spec = sensitivity_specificity(y_flag, p_flag, thresholds[WINDOW_LABEL])
    tst["study_flag"] = {"auroc": auroc(y_flag, p_flag), "auroc_ci": list(auroc_ci_bootstrap(y_flag, p_flag, n_resamples, seed)),
                         "sensitivity": flag_sens, "specificity": flag_spec,
                         "definition": "study flagged when its highest window probability >= thresholds.pe_present_on_window"}
    before, after = consistency_shares(test, thresholds)
    consistency = {"before": before, "after": after, "n_studies": len(test.study_uids), "split": "test"}
    settings = {"bootstrap_resamples": n_resamples, "seed": seed, "ci_level": 0.95,
                "auroc_ci": "stratified bootstrap, percentile", "auroc_ci_delong": "DeLong 1988, normal approximation"}
    return Report(test=tst, validation=val, thresholds=thresholds, consistency=consistency,
                  notes=tuple(notes), settings=settings)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _markdown(report: Report) -> str:
    t = report.test
    lines = [
        "# Evaluation report", "",
        f"Test: {t['n_studies']} studies, {t['n_windows']} windows. "
        f"Validation: {report.validation['n_studies']} studies, {report.validation['n_windows']} windows.", "",
        f"Thresholds: {THRESHOLD_RULE}.", "",
        "| label | test AUROC | 95% CI (bootstrap) | 95% CI (DeLong) | threshold | sensitivity | specificity | test pos/neg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in ALL_LABELS:
        lo, hi = t["auroc_ci"][label]
        dlo, dhi = t["auroc_ci_delong"][label]
        lines.append(
            f"| {label} | {_fmt(t['auroc'][label])} | {_fmt(lo)}-{_fmt(hi)} | {_fmt(dlo)}-{_fmt(dhi)} | "
            f"{_fmt(report.thresholds[label])} | {_fmt(t['sensitivity'][label])} | {_fmt(t['specificity'][label])} | "
            f"{t['positives'][label]}/{t['negatives'][label]} |"
        )
    c = report.consistency
    flag = t.get("study_flag")
    if flag:
        lines += ["", f"Study flag (PE present: highest window probability >= {_fmt(report.thresholds[WINDOW_LABEL])}), "
                  f"test: AUROC {_fmt(flag['auroc'])} ({_fmt(flag['auroc_ci'][0])}-{_fmt(flag['auroc_ci'][1])}), "
                  f"sensitivity {_fmt(flag['sensitivity'])}, specificity {_fmt(flag['specificity'])}."]
    lines += [
        "", f"Competition weighted log loss: test {_fmt(t['weighted_log_loss'], 4)}, "
        f"validation {_fmt(report.validation['weighted_log_loss'], 4)}.", "",
        f"Studies breaking the RSNA label-consistency rules at these thresholds (test): "
        f"{_fmt(100 * c['before'], 1)}% raw, {_fmt(100 * c['after'], 1)}% after make_consistent.",
    ]
    if report.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def _plot_roc(pred: SplitPredictions, report: Report, split: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(20, 8.4), constrained_layout=True)
    metrics = report.test if split == "test" else report.validation
    for ax, label in zip(axes.ravel(), ALL_LABELS):
        y, p = pred.label_arrays(label)
        pos, neg = _split(y, p)
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        if pos.size and neg.size:
            cands = np.concatenate([[np.inf], np.unique(p)[::-1]])
            tpr = 1.0 - np.searchsorted(np.sort(pos), cands, side="left") / pos.size
            fpr = 1.0 - np.searchsorted(np.sort(neg), cands, side="left") / neg.size
            ax.plot(fpr, tpr, lw=1.8)
            t = report.thresholds[label]
            ax.plot([np.mean(neg >= t)], [np.mean(pos >= t)], "o", color="C3", label=f"threshold {t:.3f}")
            ax.legend(loc="lower right", fontsize=8)
            title = f"{label}\nAUROC {metrics['auroc'][label]:.3f}"
        else:
            title = f"{label}\nAUROC n/a (one class)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
    fig.suptitle(f"ROC curves ({split} split)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(report: Report, out_dir: Path | str, validation: SplitPredictions | None = None,
                 test: SplitPredictions | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write report.json, report.md and the ROC PNGs (when predictions are given); return the paths.

    ``extra``: further top-level sections of report.json after the report's own (e.g. phase 2's
    ``phase1`` and ``loss``), NaN -> null; they may not replace a section of the report. The one
    writer of report.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    data = report.to_dict()
    clash = sorted(set(data) & set(extra or {}))
    if clash:
        raise ValueError(f"write_report: extra sections {clash} would replace the report's own")
    data.update(json_safe(dict(extra or {})))
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(_markdown(report), encoding="utf-8")
    for split, pred in (("test", test), ("validation", validation)):
        if pred is not None and pred.study_uids:
            paths[f"roc_{split}"] = out / f"roc_{split}.png"
            _plot_roc(pred, report, split, paths[f"roc_{split}"])
    return paths
