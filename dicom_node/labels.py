"""The RSNA-STR PE label set, the competition weights and the label-consistency rules.

Shared by the node (numpy only) and the training package. The rules are those of the
RSNA-STR Pulmonary Embolism Detection challenge: a study is either *positive* (at least
one image with PE) or *negative*, and the nine study labels must agree with that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "WINDOW_LABEL",
    "STUDY_LABELS",
    "ALL_LABELS",
    "DISPLAY_NAMES",
    "PE_FINDING_LABELS",
    "display_name",
    "QA_COLUMNS",
    "CSV_COLUMNS",
    "IMAGE_WEIGHT",
    "STUDY_LABEL_WEIGHTS",
    "ConsistencyResult",
    "consistency_violations",
    "make_consistent",
    "sigmoid",
]

WINDOW_LABEL = "pe_present_on_window"

#: The nine study-level labels scored by the challenge, in the order used by every model head.
STUDY_LABELS: tuple[str, ...] = (
    "negative_exam_for_pe",
    "indeterminate",
    "chronic_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "leftsided_pe",
    "rightsided_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
)
ALL_LABELS: tuple[str, ...] = (WINDOW_LABEL, *STUDY_LABELS)

#: label -> the clinical name shown to people (heatmap captions, the summary chart, docs); the one home
#: of these names. Raw label ids stay in machine-readable places (manifest, SR tracking identifiers).
DISPLAY_NAMES: dict[str, str] = {
    WINDOW_LABEL: "PE (any window)",
    "negative_exam_for_pe": "Negative exam for PE",
    "indeterminate": "Indeterminate exam",
    "chronic_pe": "Chronic PE",
    "acute_and_chronic_pe": "Acute and chronic PE",
    "central_pe": "Central PE",
    "leftsided_pe": "Left-sided PE",
    "rightsided_pe": "Right-sided PE",
    "rv_lv_ratio_gte_1": "RV/LV ratio >= 1",
    "rv_lv_ratio_lt_1": "RV/LV ratio < 1",
}
if tuple(DISPLAY_NAMES) != ALL_LABELS:  # a new label needs its clinical name here
    raise RuntimeError(f"DISPLAY_NAMES lists {tuple(DISPLAY_NAMES)}; expected ALL_LABELS {ALL_LABELS}")

#: labels whose "present" call is a PE finding (drawn in red); the others (negative exam,
#: indeterminate) say there is no PE to report and are drawn in a neutral colour
PE_FINDING_LABELS: frozenset[str] = frozenset(ALL_LABELS) - {"negative_exam_for_pe", "indeterminate"}


def display_name(label: str) -> str:
    """The clinical name of `label` (`DISPLAY_NAMES`); an unknown label is shown as its id."""
    return DISPLAY_NAMES.get(label, label)

#: Study-level columns of train.csv that are not scored (quality flags).
QA_COLUMNS: tuple[str, ...] = ("qa_motion", "qa_contrast", "flow_artifact", "true_filling_defect_not_pe")

#: Column order of the RSNA-STR train.csv.
CSV_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "pe_present_on_image",
    "negative_exam_for_pe",
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "leftsided_pe",
    "chronic_pe",
    "true_filling_defect_not_pe",
    "rightsided_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "indeterminate",
)

#: Weight of the image-level label in the challenge's weighted log loss.
IMAGE_WEIGHT = 0.07361963
#: Weights of the nine study labels in the challenge's weighted log loss.
STUDY_LABEL_WEIGHTS: dict[str, float] = {
    "negative_exam_for_pe": 0.0736196319,
    "indeterminate": 0.09202453988,
    "chronic_pe": 0.1042944785,
    "acute_and_chronic_pe": 0.1042944785,
    "central_pe": 0.1877300613,
    "leftsided_pe": 0.06257668712,
    "rightsided_pe": 0.06257668712,
    "rv_lv_ratio_gte_1": 0.2346625767,
    "rv_lv_ratio_lt_1": 0.0782208589,
}

_I = {name: i for i, name in enumerate(STUDY_LABELS)}


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function of logits, in float64, without overflow for large |x| (the one sigmoid of node,
    training and export)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


@dataclass(frozen=True)
class ConsistencyResult:
    """Labels after the consistency step, as booleans, plus what was changed."""

    window_positive: np.ndarray  # (N,) bool
    study: dict[str, bool]
    changed: tuple[str, ...]


def consistency_violations(window_positive: np.ndarray, study: dict[str, bool]) -> list[str]:
    """Return the RSNA consistency rules broken by one study's binary labels (empty if consistent)."""
    positive = bool(np.any(window_positive))
    s = {k: bool(study[k]) for k in STUDY_LABELS}
    broken: list[str] = []
    if positive:
        if s["rv_lv_ratio_gte_1"] == s["rv_lv_ratio_lt_1"]:
            broken.append("positive study needs exactly one of rv_lv_ratio_gte_1 / rv_lv_ratio_lt_1")
        if s["chronic_pe"] and s["acute_and_chronic_pe"]:
            broken.append("positive study may have at most one of chronic_pe / acute_and_chronic_pe")
        if not (s["central_pe"] or s["leftsided_pe"] or s["rightsided_pe"]):
            broken.append("positive study needs at least one of central_pe / leftsided_pe / rightsided_pe")
        if s["negative_exam_for_pe"] or s["indeterminate"]:
            broken.append("positive study must not be negative_exam_for_pe or indeterminate")
    else:
        if s["negative_exam_for_pe"] == s["indeterminate"]:
            broken.append("negative study needs exactly one of negative_exam_for_pe / indeterminate")
        pe_only = ("rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1", "central_pe", "leftsided_pe",
                   "rightsided_pe", "chronic_pe", "acute_and_chronic_pe")
        if any(s[k] for k in pe_only):
            broken.append("negative study must have no PE property labels")
    return broken


def make_consistent(
    window_probs: np.ndarray,
    study_probs: np.ndarray | dict[str, float],
    thresholds: dict[str, float],
) -> ConsistencyResult:
    """Turn probabilities into a consistent set of binary labels.

    The study is positive when any window reaches the window threshold *and* the model does not
    call the exam negative or indeterminate more strongly than it calls PE (compared as margins
    over each label's threshold). Within each mutually exclusive group the label with the largest
    margin over its threshold wins when the rules require exactly one; optional labels keep their
    own thresholded value unless the rules forbid it.
    """
    wp = np.asarray(window_probs, dtype=np.float64).reshape(-1)
    if isinstance(study_probs, dict):
        sp = np.array([float(study_probs[k]) for k in STUDY_LABELS])
    else:
        sp = np.asarray(study_probs, dtype=np.float64).reshape(-1)
    if sp.shape != (len(STUDY_LABELS),):
        raise ValueError(f"study_probs: expected {len(STUDY_LABELS)} values in STUDY_LABELS order, got shape {sp.shape}")
    t_win = float(thresholds.get(WINDOW_LABEL, 0.5))
    t = np.array([float(thresholds.get(k, 0.5)) for k in STUDY_LABELS])
    margin = sp - t
    raw_study = {k: bool(sp[_I[k]] >= t[_I[k]]) for k in STUDY_LABELS}
    raw_windows = wp >= t_win

    pe_margin = float(wp.max() - t_win) if wp.size else -1.0
    neg_margin = max(margin[_I["negative_exam_for_pe"]], margin[_I["indeterminate"]])
    positive = bool(raw_windows.any()) and pe_margin >= neg_margin
    out = dict(raw_study)
    if positive:
        windows = raw_windows
        out["negative_exam_for_pe"] = False
        out["indeterminate"] = False
        gte, lt = margin[_I["rv_lv_ratio_gte_1"]], margin[_I["rv_lv_ratio_lt_1"]]
        out["rv_lv_ratio_gte_1"] = bool(gte >= lt)
        out["rv_lv_ratio_lt_1"] = not out["rv_lv_ratio_gte_1"]
        if out["chronic_pe"] and out["acute_and_chronic_pe"]:
            keep = "chronic_pe" if margin[_I["chronic_pe"]] >= margin[_I["acute_and_chronic_pe"]] else "acute_and_chronic_pe"
            out["chronic_pe"] = keep == "chronic_pe"
            out["acute_and_chronic_pe"] = keep == "acute_and_chronic_pe"
        sides = ("central_pe", "leftsided_pe", "rightsided_pe")
        if not any(out[k] for k in sides):
            best = max(sides, key=lambda k: margin[_I[k]])
            out[best] = True
    else:
        windows = np.zeros_like(raw_windows)
        for k in ("rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1", "central_pe", "leftsided_pe",
                  "rightsided_pe", "chronic_pe", "acute_and_chronic_pe"):
            out[k] = False
        neg_wins = margin[_I["negative_exam_for_pe"]] >= margin[_I["indeterminate"]]
        out["negative_exam_for_pe"] = bool(neg_wins)
        out["indeterminate"] = not neg_wins
    changed = tuple(k for k in STUDY_LABELS if out[k] != raw_study[k])
    if not np.array_equal(windows, raw_windows):
        changed = (WINDOW_LABEL, *changed)
    return ConsistencyResult(window_positive=windows, study=out, changed=changed)
