"""load_series refuses geometry it cannot trust (issue 22, corpus case 11): orientation cosines that are not
orthogonal unit vectors, and RescaleSlope 0 (no longer read as 1)."""

from __future__ import annotations

import numpy as np
import pytest

from ct_factory import phantom_datasets
from dicom_node.imaging.series import SeriesError, load_series


def _with(keyword: str, value) -> list:
    datasets = phantom_datasets()
    for ds in datasets:
        setattr(ds, keyword, value)
    return datasets


def test_a_non_orthogonal_orientation_is_refused_with_the_angle_in_plain_words():
    with pytest.raises(SeriesError, match=r"cosines are 53\.1 degrees apart; expected orthogonal unit vectors") as e:
        load_series(_with("ImageOrientationPatient", [1, 0, 0, 0.6, 0.8, 0]))
    assert e.value.plain.startswith("the image orientation is invalid (image rows and columns 53 degrees apart")


def test_a_non_unit_orientation_is_refused():
    with pytest.raises(SeriesError, match=r"have lengths 2\.000 and 2\.000; expected unit vectors") as e:
        load_series(_with("ImageOrientationPatient", [2, 0, 0, 0, 2, 0]))
    assert "direction cosines of length 2.00 and 2.00" in e.value.plain


def test_an_orientation_rounded_to_scanner_precision_is_accepted():
    c = float(np.cos(np.radians(12)))
    s = float(np.sin(np.radians(12)))
    series = load_series(_with("ImageOrientationPatient", [round(c, 5), round(s, 5), 0, round(-s, 5), round(c, 5), 0]))
    assert series.shape[0] == len(phantom_datasets())


def test_rescale_slope_zero_is_refused_not_read_as_one():
    with pytest.raises(SeriesError, match=r"RescaleSlope 0; expected a non-zero number") as e:
        load_series(_with("RescaleSlope", 0))
    assert e.value.plain == "the pixel values cannot be converted to Hounsfield units (RescaleSlope 0)"


def test_a_missing_rescale_slope_still_means_one():
    datasets = phantom_datasets()
    reference = load_series(phantom_datasets())
    for ds in datasets:
        del ds.RescaleSlope
    np.testing.assert_array_equal(load_series(datasets).hu, reference.hu)
