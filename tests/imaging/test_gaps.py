"""Missing slices: gaps up to `max_gap_factor` are filled by interpolation and named; wider ones are refused
in plain words; the "not analysed" SR says why (real pydicom datasets, real highdicom SR round-trip)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from ct_factory import make_series
from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.imaging.gaps import classify_gaps
from dicom_node.imaging.series import SeriesError, load_series
from dicom_node.results.incomplete import NOT_ANALYSED, build_not_analysed_sr, missing_slices_statement
from dicom_node.results.sr import predecessor_reference
from dicom_node.results.uids import result_uid


def _ramp(n: int = 30) -> np.ndarray:
    """HU that grow by 10 per slice: an interpolated slice has exactly the value between its neighbours."""
    return np.stack([np.full((8, 8), -500.0 + 10.0 * z, dtype=np.float32) for z in range(n)])


def test_single_missing_slices_are_filled_by_interpolation_and_named():
    datasets = make_series(_ramp(), slice_spacing=2.0)
    held_back = [datasets.pop(i) for i in (20, 12, 5)]  # three gaps of one slice each
    series = load_series(datasets, min_slices=10, max_gap_factor=2.5)
    assert series.shape == (30, 8, 8) and series.missing_slices == 3
    assert [(g.after, g.missing) for g in series.gaps] == [(4, 1), (10, 1), (17, 1)]
    assert series.received_indices == tuple(z for z in range(30) if z not in (5, 12, 20))
    np.testing.assert_allclose(series.hu[:, 0, 0], -500.0 + 10.0 * np.arange(30), atol=1e-3)
    np.testing.assert_allclose(np.diff(series.positions_mm), 2.0, atol=1e-6)
    assert set(series.sop_instance_uids) == {d.SOPInstanceUID for d in datasets}  # only received instances
    assert not {d.SOPInstanceUID for d in held_back} & set(series.sop_instance_uids)
    note = missing_slices_statement(series)
    first, last = series.gaps[0].from_mm, series.gaps[-1].to_mm
    assert note.startswith(f"Analysed with 3 missing slices between {first:.1f} and {last:.1f} mm along the slice "
                           "normal (3 gaps), filled by interpolation")


def test_without_a_gap_factor_a_missing_slice_is_refused_as_before():
    datasets = make_series(_ramp(), slice_spacing=2.0)
    del datasets[7]
    with pytest.raises(SeriesError, match=r"slice spacing varies \(2\.00-4\.00 mm, median 2\.00 mm\); first irregular "
                                          r"gap of 4\.00 mm") as e:
        load_series(datasets, min_slices=10)
    assert e.value.plain.startswith("slices are missing between ") and "2.0 times the slice spacing" in e.value.plain


def test_a_forty_percent_gap_is_refused_with_the_reason_in_plain_words():
    datasets = make_series(_ramp(), slice_spacing=2.0)
    kept = datasets[:9] + datasets[21:]  # 12 of 30 slices (40 %) missing in one gap
    with pytest.raises(SeriesError) as e:
        load_series(kept, min_slices=10, max_gap_factor=2.5)
    assert "Series " not in e.value.plain and kept[0].SeriesInstanceUID not in e.value.plain
    assert "(a gap of 26.0 mm, 13.0 times the slice spacing of 2.00 mm; the analysis bridges gaps up to 2.5 times" \
        in e.value.plain


def test_too_few_slices_and_irregular_gaps_say_so_in_plain_words():
    with pytest.raises(SeriesError) as few:
        load_series(make_series(_ramp(8), slice_spacing=2.0), min_slices=20, max_gap_factor=2.5)
    assert few.value.plain == "the series has 8 slices; at least 20 are needed (was the transfer cut short?)"
    plan = classify_gaps(np.array([0.0, 2.0, 4.0, 7.0, 9.0, 11.0]), 2.5)  # 3 mm: no multiple of 2 mm
    assert plan.refused is not None and plan.refused_reason == "irregular" and plan.missing == 0


def test_the_not_analysed_sr_states_the_reason_the_research_statement_and_its_predecessor():
    datasets = make_series(_ramp(), slice_spacing=2.0)
    series_uid, study_uid = datasets[0].SeriesInstanceUID, datasets[0].StudyInstanceUID
    bundle = {"name": "tiny", "version": "1", "model_uid": "2.25.7"}
    reason = "the series has 8 slices; at least 20 are needed (was the transfer cut short?)"
    sr = build_not_analysed_sr(datasets, reason, bundle, series_number=9901, series_description="PE (research)")
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    (statement,) = [i for i in back.ContentSequence if i.ValueType == "CONTAINER"
                    and i.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    texts = [(i.ConceptNameCodeSequence[0].CodeMeaning, i.TextValue) for i in statement.ContentSequence]
    assert texts[:2] == [("Impression", f"{NOT_ANALYSED}: {reason}"), ("Comment", RESEARCH_USE_STATEMENT)]
    assert back.SOPInstanceUID == result_uid("sr", series_uid, "2.25.7", 0)
    assert back.StudyInstanceUID == study_uid and back.PatientID == datasets[0].PatientID
    refs = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert len(refs) == 30 and "PixelData" not in back
    revised = build_not_analysed_sr(datasets, reason, bundle, series_number=9901, series_description="PE", revision=1,
                                    predecessor=predecessor_reference(study_uid, series_uid, "2.25.7", 1,
                                                                      back.SOPInstanceUID))
    assert revised.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == back.SOPInstanceUID
