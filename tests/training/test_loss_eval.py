"""Losses against hand computation, and the evaluation against scikit-learn and the RSNA rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from dicom_node.labels import ALL_LABELS, IMAGE_WEIGHT, STUDY_LABEL_WEIGHTS, STUDY_LABELS, WINDOW_LABEL
from dicom_node_training.evaluate import (
    SplitPredictions,
    auroc,
    auroc_ci_bootstrap,
    auroc_ci_delong,
    consistency_shares,
    evaluate,
    sensitivity_specificity,
    write_report,
    youden_threshold,
)
from dicom_node_training.loss import phase1_loss, sequence_loss, weighted_log_loss

W_K = np.array([STUDY_LABEL_WEIGHTS[k] for k in STUDY_LABELS])


def bce(z, y):
    p = 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_phase1_loss_is_mean_bce():
    z = np.array([2.0, -1.0, 0.5])
    y = np.array([1.0, 0.0, 0.0])
    got = phase1_loss(torch.tensor(z), torch.tensor(y)).item()
    assert got == pytest.approx(bce(z, y).mean(), rel=1e-12)


def _small_case():
    # two studies, L = 4; study 0 has 4 valid windows (1 positive), study 1 has 2 valid (0 positive)
    wz = np.array([[1.0, -2.0, 0.5, 3.0], [-1.0, 0.2, 7.0, -7.0]])
    wy = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=np.float64)
    sz = np.linspace(-2, 2, 18).reshape(2, 9)
    sy = np.zeros((2, 9))
    sy[0, [4, 6, 7]] = 1  # positive study: central, right, rv/lv >= 1
    sy[1, 0] = 1  # negative exam
    return wz, wy, mask, sz, sy


def _torch(*arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


def test_sequence_loss_against_hand_computation():
    wz, wy, mask, sz, sy = _small_case()
    q = np.array([1 / 4, 0.0])
    # by hand: window terms only for study 0 (q_1 = 0), over its 4 windows
    window_term = IMAGE_WEIGHT * 0.25 * bce(wz[0], wy[0]).sum()
    study_term = (W_K * bce(sz, sy)).sum()
    paper = (window_term + study_term) / ((4 + 9) + (2 + 9))
    competition = (window_term + study_term) / (IMAGE_WEIGHT * 0.25 * 4 + 2 * W_K.sum())
    args = _torch(wz, sz, wy, sy, mask)
    assert sequence_loss(*args).item() == pytest.approx(paper, rel=1e-12)
    assert sequence_loss(*args, normalization="competition").item() == pytest.approx(competition, rel=1e-12)
    assert sequence_loss(*args, q=torch.tensor(q)).item() == pytest.approx(paper, rel=1e-12)
    # padded steps contribute nothing, whatever their logits and labels
    wz2, wy2 = wz.copy(), wy.copy()
    wz2[1, 2:] = [40.0, -40.0]
    wy2[1, 2:] = [0.0, 1.0]
    args2 = _torch(wz2, sz, wy2, sy, mask)
    assert sequence_loss(*args2).item() == pytest.approx(paper, rel=1e-12)


def test_sequence_loss_gradients_flow_and_bad_normalization_fails():
    wz, wy, mask, sz, sy = _small_case()
    wz_t, sz_t = torch.tensor(wz, requires_grad=True), torch.tensor(sz, requires_grad=True)
    sequence_loss(wz_t, sz_t, *_torch(wy, sy, mask)).backward()
    assert wz_t.grad[0].abs().sum() > 0 and torch.all(wz_t.grad[1] == 0)  # q = 0 -> no window gradient
    assert torch.all(sz_t.grad != 0)
    with pytest.raises(ValueError, match="normalization must be 'paper' or 'competition', got 'mean'"):
        sequence_loss(*_torch(wz, sz, wy, sy, mask), normalization="mean")


def test_competition_loss_equals_numpy_metric_on_unpadded_batch():
    wz, wy, mask, sz, sy = _small_case()
    torch_loss = sequence_loss(*_torch(wz, sz, wy, sy, mask), normalization="competition").item()
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    metric = weighted_log_loss([sig(wz[0]), sig(wz[1, :2])], [wy[0], wy[1, :2]], sig(sz), sy)
    assert torch_loss == pytest.approx(metric, rel=1e-9)


def test_weighted_log_loss_hand_case_and_clipping():
    wp = [np.array([0.9, 0.2]), np.array([0.3])]
    wy = [np.array([1.0, 0.0]), np.array([0.0])]
    sp = np.full((2, 9), 0.25)
    sy = np.zeros((2, 9))
    sy[1, 0] = 1
    num = IMAGE_WEIGHT * 0.5 * (-np.log(0.9) - np.log(0.8))
    num += W_K.sum() * -np.log(0.75) * 2 - W_K[0] * np.log(0.25) + W_K[0] * np.log(0.75)
    den = IMAGE_WEIGHT * 0.5 * 2 + 2 * W_K.sum()
    assert weighted_log_loss(wp, wy, sp, sy) == pytest.approx(num / den, rel=1e-12)
    assert math.isfinite(weighted_log_loss([np.array([0.0])], [np.array([1.0])], np.zeros((1, 9)), np.ones((1, 9))))
    with pytest.raises(ValueError, match=r"study 0 has 2 window probs but 1 labels"):
        weighted_log_loss([np.zeros(2)], [np.zeros(1)], np.zeros((1, 9)), np.zeros((1, 9)))


# ---------------------------------------------------------------- evaluation


def test_auroc_matches_sklearn_with_ties_and_nan_for_one_class():
    rng = np.random.default_rng(3)
    y = rng.random(500) < 0.3
    p = np.round(rng.random(500) * 0.6 + 0.4 * y, 2)  # rounding makes ties
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert math.isnan(auroc(np.zeros(5), rng.random(5)))
    assert all(math.isnan(v) for v in auroc_ci_bootstrap(np.ones(5), rng.random(5)))


def test_confidence_intervals_cover_and_are_seeded():
    rng = np.random.default_rng(4)
    y = rng.random(400) < 0.25
    p = rng.random(400) * 0.7 + 0.3 * y
    a = roc_auc_score(y, p)
    lo, hi = auroc_ci_bootstrap(y, p, n_resamples=1000, seed=11)
    assert lo < a < hi and 0.02 < hi - lo < 0.2
    assert (lo, hi) == auroc_ci_bootstrap(y, p, n_resamples=1000, seed=11)
    assert (lo, hi) != auroc_ci_bootstrap(y, p, n_resamples=1000, seed=12)
    dlo, dhi = auroc_ci_delong(y, p)
    assert dlo < a < dhi
    assert abs((hi - lo) - (dhi - dlo)) < 0.25 * (dhi - dlo)  # two estimates of the same spread agree


def test_youden_threshold_rule_and_sensitivity_specificity():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    # J = 0.5 at 0.35, 0.4 and 0.8: ties go to the lowest threshold
    assert youden_threshold(y, p) == 0.35
    assert sensitivity_specificity(y, p, 0.35) == (1.0, 0.5)
    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.4
    p = rng.random(300) * 0.6 + 0.3 * y
    t = youden_threshold(y, p)
    fpr, tpr, thr = roc_curve(y, p)
    assert (lambda s, c: s + c - 1)(*sensitivity_specificity(y, p, t)) == pytest.approx((tpr - fpr).max())
    assert youden_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5


def _study(window_probs, study_probs: dict[str, float]):
    return np.asarray(window_probs, dtype=float), np.array([study_probs.get(k, 0.0) for k in STUDY_LABELS])


def test_consistency_shares_before_and_after():
    studies = [
        _study([0.9, 0.1], {"central_pe": 0.9, "rv_lv_ratio_lt_1": 0.8}),  # consistent positive
        _study([0.1, 0.2], {"negative_exam_for_pe": 0.9}),  # consistent negative
        _study([0.9, 0.8], {"negative_exam_for_pe": 0.2}),  # positive with no side and no rv/lv: broken
        _study([0.1, 0.1], {"central_pe": 0.9}),  # negative with a PE property and no negative label: broken
    ]
    pred = SplitPredictions(
        study_uids=tuple("abcd"), window_probs=tuple(s[0] for s in studies),
        window_labels=tuple(np.zeros(2) for _ in studies),
        study_probs=np.stack([s[1] for s in studies]), study_labels=np.zeros((4, 9)),
    )
    assert consistency_shares(pred, {k: 0.5 for k in ALL_LABELS}) == (0.5, 0.0)


def _random_split(rng, n_studies, shift=0.0):
    wl, wp = [], []
    sl = np.zeros((n_studies, 9))
    for i in range(n_studies):
        n = int(rng.integers(3, 50))
        positive = rng.random() < 0.4
        y = np.zeros(n)
        if positive:
            y[rng.integers(0, n // 2): n // 2 + 2] = 1
            sl[i, [4, 5, 6]] = rng.random(3) < 0.6
            sl[i, 7] = rng.random() < 0.5
            sl[i, 8] = 1 - sl[i, 7]
            sl[i, 2] = rng.random() < 0.2
        else:
            sl[i, 0] = 1
        wl.append(y)
        wp.append(np.clip(0.35 * y + rng.random(n) * 0.65 + shift, 0, 1))
    sl[:, 1] = 0  # no indeterminate studies: one class
    sp = np.clip(0.4 * sl + 0.6 * rng.random(sl.shape) + shift, 0, 1)
    return SplitPredictions(tuple(f"1.2.{i}" for i in range(n_studies)), tuple(wp), tuple(wl), sp, sl)


def test_evaluate_writes_the_report(tmp_path):
    rng = np.random.default_rng(6)
    val, test = _random_split(rng, 60, shift=0.1), _random_split(rng, 80)
    report = evaluate(val, test, n_resamples=200, seed=1)
    paths = write_report(report, tmp_path, val, test)
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    for label in ALL_LABELS:
        assert label in data["test"]["auroc"] and label in data["thresholds"]
        assert label in data["test"]["sensitivity"] and label in data["test"]["specificity"]
    y, p = test.label_arrays("pe_present_on_window")
    assert data["test"]["auroc"]["pe_present_on_window"] == pytest.approx(roc_auc_score(y, p))
    k = STUDY_LABELS.index("central_pe")
    assert data["test"]["auroc"]["central_pe"] == pytest.approx(roc_auc_score(test.study_labels[:, k], test.study_probs[:, k]))
    lo, hi = data["test"]["auroc_ci"]["central_pe"]
    assert lo <= data["test"]["auroc"]["central_pe"] <= hi
    # thresholds come from validation, not test
    assert data["thresholds"]["central_pe"] == youden_threshold(val.study_labels[:, k], val.study_probs[:, k])
    assert data["test"]["auroc"]["indeterminate"] is None
    assert data["test"]["auroc_ci"]["indeterminate"] == [None, None]
    assert any("indeterminate has only one class" in n for n in data["notes"])
    assert data["test"]["weighted_log_loss"] == pytest.approx(
        weighted_log_loss(test.window_probs, test.window_labels, test.study_probs, test.study_labels))
    assert data["consistency"]["after"] == 0.0 and 0.0 <= data["consistency"]["before"] <= 1.0
    assert data["test"]["n_studies"] == 80 and data["test"]["n_windows"] == test.n_windows
    md = paths["markdown"].read_text()
    assert "| central_pe |" in md and "Youden" in md
    for name in ("roc_test", "roc_validation"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_predictions_from_logits_and_validation():
    wl = np.zeros((2, 40))
    wl[0, :5] = [-2, -1, 0, 1, 2]
    wl[1] = np.linspace(-4, 4, 40)
    pred = SplitPredictions.from_logits(
        ["a", "b"], wl, [5, 79], [np.zeros(5), np.zeros(79)], np.zeros((2, 9)), np.zeros((2, 9)))
    np.testing.assert_allclose(pred.window_probs[0], 1 / (1 + np.exp(-np.array([-2, -1, 0, 1, 2.0]))))
    np.testing.assert_allclose(pred.window_probs[1], 1 / (1 + np.exp(-np.linspace(-4, 4, 79))), atol=1e-12)
    assert pred.n_windows == 84
    with pytest.raises(ValueError, match=r"study b has window probs \(3,\) and labels \(2,\)"):
        SplitPredictions(("a", "b"), (np.zeros(2), np.zeros(3)), (np.zeros(2), np.zeros(2)), np.zeros((2, 9)), np.zeros((2, 9)))


def test_window_threshold_is_chosen_at_the_study_level():
    from dicom_node_training.evaluate import study_flag_arrays, youden_threshold

    rng = np.random.default_rng(11)
    val, test = _random_split(rng, 60, shift=0.1), _random_split(rng, 80)
    report = evaluate(val, test, n_resamples=50, seed=1)
    y_study, p_study = study_flag_arrays(val)
    assert report.thresholds[WINDOW_LABEL] == youden_threshold(y_study, p_study)
    y_win, p_win = val.label_arrays(WINDOW_LABEL)
    assert report.thresholds[WINDOW_LABEL] != youden_threshold(y_win, p_win)  # the window-level rule differs here
    flag = report.test["study_flag"]
    y_t, p_t = study_flag_arrays(test)
    assert flag["auroc"] == pytest.approx(roc_auc_score(y_t, p_t))
    assert flag["sensitivity"] == pytest.approx(np.mean(p_t[y_t == 1] >= report.thresholds[WINDOW_LABEL]))
