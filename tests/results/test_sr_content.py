"""The SR's content built around the clinical statement (issue 17 items 1 and 2).

Cases: the `pe_case` / `no_pe_case` fixtures of tests/results/conftest.py. Reading order (impression, research-use statement, then the groups), one group per finding with
its own concept, the PE region SCOORDs at the hottest heatmap pixel of each key slice, tracking
UIDs, the image library, and the validators (dciodvfy, dsrdump, Orthanc) on the new tree.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace

import pytest
from test_results import BUNDLE, DCIODVFY, DSRDUMP, WITH_KOS, needs_dicom3tools, needs_dsrdump, round_trip

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.labels import WINDOW_LABEL
from dicom_node.results import build_results
from dicom_node.results.codes import FINDING_GROUPS, IMPRESSION, LABEL_CODING, PE_FINDING
from dicom_node.results.sr import impression, region_point
from dicom_node.tools.demo import read_findings


def _name(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _groups(sr) -> dict[str, list]:
    imaging = next(i for i in sr.ContentSequence if _name(i) == "Imaging Measurements")
    return {next(c.TextValue for c in g.ContentSequence if _name(c) == "Tracking Identifier"): list(g.ContentSequence)
            for g in imaging.ContentSequence}


def _finding(children):
    return next(c.ConceptCodeSequence[0] for c in children if _name(c) == "Finding")


def test_impression_then_research_statement_before_any_image_reference(pe_case, no_pe_case):
    for _, _, pred, result in (pe_case, no_pe_case):
        sr = round_trip(result.sr)
        items = list(_walk(sr.ContentSequence))
        texts = [i for i in items if i.ValueType == "TEXT" and _name(i) in ("Impression", "Comment")]
        # then the validation note (these cases' bundle records no validation AUROC), before any image too
        assert [_name(t) for t in texts] == ["Impression", "Comment", "Comment"]
        assert texts[2].TextValue == "label validation unknown: the bundle records no validation AUROC"
        assert texts[0].ConceptNameCodeSequence[0].CodeValue == IMPRESSION.value
        assert texts[1].TextValue == RESEARCH_USE_STATEMENT
        first_image = next(n for n, i in enumerate(items) if i.ValueType in ("IMAGE", "SCOORD"))
        assert max(items.index(t) for t in texts) < first_image
        assert texts[0].TextValue == impression(pred.labels)


def test_impression_wording():
    base = dict.fromkeys(LABEL_CODING, False)
    pe = {**base, WINDOW_LABEL: True, "central_pe": True, "rightsided_pe": True, "rv_lv_ratio_gte_1": True}
    assert impression(pe) == "AI suggests pulmonary embolism: present, central and right, acute; RV/LV ratio >= 1 likely"
    chronic = {**base, WINDOW_LABEL: True, "leftsided_pe": True, "chronic_pe": True, "rv_lv_ratio_lt_1": True}
    assert impression(chronic) == "AI suggests pulmonary embolism: present, left, chronic; RV/LV ratio < 1 likely"
    assert impression({**base, "negative_exam_for_pe": True}) == "AI suggests no pulmonary embolism; exam quality adequate"
    assert "indeterminate" in impression({**base, "indeterminate": True})


def test_one_group_per_finding_with_its_concept(pe_case, no_pe_case):
    for _, _, pred, result in (pe_case, no_pe_case):
        groups = _groups(round_trip(result.sr))
        for finding, (tracking, _) in FINDING_GROUPS.items():
            got = _finding(groups[tracking])
            assert (got.CodeValue, got.CodingSchemeDesignator) == (finding.value, finding.scheme_designator)
        # only the PE group and its regions claim Finding = Pulmonary embolism
        pe_groups = [t for t, children in groups.items() if _finding(children).CodeValue == PE_FINDING.value]
        assert pe_groups[0] == "pulmonary_embolism" and all(t.startswith("pulmonary_embolism") for t in pe_groups)
        sites = {c.ConceptCodeSequence[0].CodeMeaning for c in groups["pulmonary_embolism"] if _name(c) == "Finding Site"}
        expected = {LABEL_CODING[k].present[1].meaning for k in ("central_pe", "leftsided_pe", "rightsided_pe")
                    if pred.labels[k]}
        assert sites == expected
        # every label reads back with its probability, threshold and call
        found = read_findings(result.sr)
        probs = pred.label_probabilities()
        assert {k: (f.probability, f.threshold, f.present) for k, f in found.items()} == {
            k: (pytest.approx(probs[k], abs=1e-6), pytest.approx(pred.thresholds[k]), pred.labels[k]) for k in probs}


def test_region_scoords_at_the_hottest_point_of_each_positive_key_slice(pe_case, no_pe_case):
    series, _, pred, result = pe_case
    groups = _groups(round_trip(result.sr))
    regions = {t: c for t, c in groups.items() if "region" in t}
    expected = [ks for ks in result.key_slices if pred.window_positive[ks.window_index]]
    assert len(expected) >= 2 and len(regions) == len(expected)
    rows, cols = series.hu.shape[1:]
    for ks in expected:
        children = regions[f"pulmonary_embolism region {ks.rank + 1}"]
        scoord = next(c for c in children if c.ValueType == "SCOORD")
        assert scoord.GraphicType == "POINT"
        x, y = (float(v) for v in scoord.GraphicData)
        assert 0 <= x <= cols and 0 <= y <= rows
        assert (int(y), int(x)) == ks.hottest_point
        assert ks.heatmap[int(y), int(x)] == ks.heatmap.max()
        assert (x, y) == region_point(ks)
        assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ks.sop_instance_uid
        num = next(c for c in children if c.ValueType == "NUM" and _name(c) == "Probability")
        assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(ks.window_probability, abs=1e-6)
        inferred = next(c for c in num.ContentSequence if c.ValueType == "SCOORD")
        assert [float(v) for v in inferred.GraphicData] == [x, y]
    # a study called PE absent marks no region
    assert not [t for t in _groups(no_pe_case[3].sr) if "region" in t]


def test_tracking_uids_unique_and_deterministic(pe_case):
    series, windows, pred, result = pe_case

    def uids(sr) -> list[str]:
        return [c.UID for c in _walk(sr.ContentSequence) if _name(c) == "Tracking Unique Identifier"]

    first = uids(result.sr)
    assert len(first) == len(set(first)) == len(_groups(result.sr))
    assert uids(build_results(series, windows, pred, BUNDLE, WITH_KOS).sr) == first
    other = build_results(series, windows, replace(pred, model_uid="2.25.77"), replace(BUNDLE, model_uid="2.25.77"),
                          WITH_KOS)
    assert not set(uids(other.sr)) & set(first)


def test_image_library_lists_the_referenced_images_only(pe_case):
    series, _, _, result = pe_case
    sr = round_trip(result.sr)
    library = next(i for i in sr.ContentSequence if _name(i) == "Image Library")
    entries = [e for g in library.ContentSequence for e in g.ContentSequence if e.ValueType == "IMAGE"]
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in _walk(sr.ContentSequence)
                  if i.ValueType == "IMAGE" and i not in entries}
    assert {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries} == referenced
    assert referenced == {k.sop_instance_uid for k in result.key_slices}
    assert len(entries) < len(series.sop_instance_uids)


@needs_dicom3tools
@needs_dsrdump
def test_dciodvfy_clean_and_dsrdump_reads(pe_case, no_pe_case, tmp_path):
    for name, (_, _, _, result) in (("positive", pe_case), ("negative", no_pe_case)):
        path = tmp_path / f"{name}.dcm"
        result.sr.save_as(path, enforce_file_format=True)
        out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        assert [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line] == []
        dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "Impression" in dump.stdout, dump.stderr


@pytest.mark.orthanc
def test_orthanc_stores_the_sr(orthanc, pe_case, no_pe_case):
    from pynetdicom import AE
    from pynetdicom.sop_class import Comprehensive3DSRStorage

    ae = AE(ae_title="PENODE")
    ae.add_requested_context(Comprehensive3DSRStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(r.sr).Status for *_, r in (pe_case, no_pe_case)]
    finally:
        assoc.release()
    assert statuses == [0, 0]
    assert sorted(orthanc.instance_tags(i)["Modality"] for i in orthanc.instances()) == ["SR", "SR"]


def _texts(sr) -> list[str]:
    """Impression and Comment texts in document order (not the observer context's names)."""
    return [str(i.TextValue) for i in _walk(sr.ContentSequence)
            if i.ValueType == "TEXT" and _name(i) in ("Impression", "Comment")]


def test_weak_labels_are_marked_in_their_group_and_named_after_the_research_statement(pe_case):
    series, windows, pred, _ = pe_case
    manifest = {"name": BUNDLE.name, "version": BUNDLE.version, "model_uid": BUNDLE.model_uid,
                "weak_labels": ["chronic_pe", "rv_lv_ratio_lt_1"], "weak_auroc_floor": 0.7}
    sr = round_trip(build_results(series, windows, pred, manifest, WITH_KOS).sr)
    statement = _texts(sr)[:3]
    assert statement[1] == RESEARCH_USE_STATEMENT
    assert statement[2] == ("low-confidence outputs, not validated (validation AUROC below 0.70): "
                            "chronic_pe, rv_lv_ratio_lt_1")
    groups = _groups(sr)
    notes = {name: [str(c.TextValue) for c in children if c.ValueType == "TEXT" and _name(c) == "Comment"]
             for name, children in groups.items()}
    pe_group = FINDING_GROUPS[PE_FINDING][0]
    assert notes[pe_group] == ["low confidence, not validated (validation AUROC below 0.70): chronic_pe"]
    rv_lt = next(name for name in groups if "lt_1" in name or "< 1" in name)
    assert notes[rv_lt] == ["low confidence, not validated (validation AUROC below 0.70): rv_lv_ratio_lt_1"]
    assert sum(len(v) for v in notes.values()) == 2  # no other group claims low confidence
    assert set(read_findings(sr)) == set(LABEL_CODING)  # marked, not hidden: every label still reported
    assert {k for k, f in read_findings(sr).items() if not f.validated} == {"chronic_pe", "rv_lv_ratio_lt_1"}


def test_omit_weak_labels_leaves_them_out_and_says_so_but_never_the_pe_label(pe_case):
    series, windows, pred, _ = pe_case
    manifest = {"name": BUNDLE.name, "version": BUNDLE.version, "model_uid": BUNDLE.model_uid,
                "weak_labels": [WINDOW_LABEL, "rv_lv_ratio_lt_1"], "weak_auroc_floor": 0.7}
    sr = round_trip(build_results(series, windows, pred, manifest, replace(WITH_KOS, omit_weak_labels=True)).sr)
    assert "left out of this report as configured ([results] omit_weak_labels): rv_lv_ratio_lt_1" in _texts(sr)
    found = read_findings(sr)
    assert WINDOW_LABEL in found and "rv_lv_ratio_lt_1" not in found
    assert set(found) == set(LABEL_CODING) - {"rv_lv_ratio_lt_1"}


def test_unknown_validation_is_stated_once(pe_case):
    series, windows, pred, result = pe_case
    manifest = {"name": BUNDLE.name, "version": BUNDLE.version, "model_uid": BUNDLE.model_uid}
    sr = round_trip(build_results(series, windows, pred, manifest, WITH_KOS).sr)
    assert _texts(sr).count("label validation unknown: the bundle records no validation AUROC") == 1
