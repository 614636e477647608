"""The SR test cases of tests/results as plain functions (the fixtures in conftest.py and the docs
screenshot of test_dsr2html.py use them)."""

from __future__ import annotations

from typing import Any

import numpy as np
from test_results import BUNDLE, WITH_KOS, embolus_point, hand_made_prediction, heatmaps_at, phantom_case

from dicom_node.results import build_results


def positive_case() -> tuple[Any, Any, Any, Any]:
    """The `pe_case` fixture's value, without pytest (the docs screenshot uses it)."""
    study, series, windows = phantom_case("positive", 11)
    point = embolus_point(study.embolus_mask)
    win = int(windows.geometry.original_to_model(*point)[0])
    other = (win + 4) % len(windows.slice_uids)
    z2 = int(np.clip(point[0] + (other - win) * 4, 0, series.hu.shape[0] - 1))
    points = [point, (z2, point[1] + 10, point[2] - 12)]
    pred = hand_made_prediction(series, windows, positive=True, heatmaps=heatmaps_at(windows, points),
                       hot_windows=(win, int(windows.geometry.original_to_model(*points[1])[0])))
    return series, windows, pred, build_results(series, windows, pred, BUNDLE, WITH_KOS)


def negative_case() -> tuple[Any, Any, Any, Any]:
    """The `no_pe_case` fixture's value."""
    _, series, windows = phantom_case("negative", 12)
    hm = np.random.default_rng(3).uniform(0, 1, (len(windows.slice_uids), 2, 6, 6)).astype(np.float32)
    pred = hand_made_prediction(series, windows, positive=False, heatmaps=hm)
    return series, windows, pred, build_results(series, windows, pred, BUNDLE, WITH_KOS)
