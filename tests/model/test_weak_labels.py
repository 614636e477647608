"""Weak labels in the bundle manifest (issue 17 item 4): read from new manifests, computed for older ones
from their validation metrics, unknown without them; the shipped demo bundle loads unchanged."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from dicom_node.labels import ALL_LABELS, WINDOW_LABEL
from dicom_node.model.bundle import (
    DEFAULT_WEAK_AUROC_FLOOR,
    MANIFEST_NAME,
    BundleError,
    BundleManifest,
    LabelValidation,
    default_bundle_path,
    label_validation_of,
    load_bundle,
    weak_labels_below,
)
from dicom_node.results.sr import BundleInfo

ROOT = Path(__file__).resolve().parents[2]


def _demo_manifest() -> dict:
    return json.loads((default_bundle_path() / MANIFEST_NAME).read_text())


def _older_manifest() -> dict:
    """The demo manifest as a bundle exported before weak labels were recorded (no weak_labels, no floor)."""
    data = _demo_manifest()
    for key in ("weak_labels", "weak_auroc_floor"):
        data.pop(key, None)
    data["metrics"].pop("validation_auroc", None)
    return data


def test_demo_bundle_loads_unchanged_with_the_weak_labels_it_records():
    path = default_bundle_path()
    raw = (path / MANIFEST_NAME).read_bytes()
    m = load_bundle(path).manifest  # sha256 of every file verified
    recorded = json.loads(raw)["weak_labels"]  # demo 0.3.0 records its list (empty: every label validated >= 0.70)
    assert m.weak_labels == tuple(recorded) and m.weak_labels_source == "manifest"
    assert m.weak_auroc_floor == DEFAULT_WEAK_AUROC_FLOOR == 0.70
    assert m.label_validation.known and not m.label_validation.is_weak("chronic_pe")
    assert (path / MANIFEST_NAME).read_bytes() == raw  # loading writes nothing back
    tracked = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:dicom_node/model/demo/{MANIFEST_NAME}"],
                             capture_output=True)
    if tracked.returncode == 0:  # in a checkout: the shipped manifest is the committed one
        assert hashlib.sha256(tracked.stdout).hexdigest() == hashlib.sha256(raw).hexdigest()


def test_an_older_manifest_without_validation_loads_with_unknown_weak_labels():
    m = BundleManifest.from_json(_older_manifest())
    assert m.weak_labels is None and m.weak_labels_source == "unknown"
    assert not m.label_validation.known and not m.label_validation.is_weak("chronic_pe")
    assert "weak_labels" not in m.to_json()  # nothing computed is written back


def test_older_manifest_with_validation_metrics_gets_weak_labels_at_load():
    data = _older_manifest()
    data["metrics"]["validation_auroc"] = {k: 0.9 for k in ALL_LABELS} | {"chronic_pe": 0.55, "indeterminate": 0.6999}
    del data["metrics"]["validation_auroc"]["central_pe"]  # undefined (one class): not validated
    m = BundleManifest.from_json(data)
    assert m.weak_labels == ("indeterminate", "chronic_pe", "central_pe")  # ALL_LABELS order
    assert m.weak_labels_source == "metrics" and m.weak_auroc_floor == 0.70
    assert "weak_labels" not in m.to_json()


def test_new_manifest_records_weak_labels_and_its_floor():
    data = _demo_manifest() | {"weak_labels": ["chronic_pe", WINDOW_LABEL], "weak_auroc_floor": 0.8}
    data["metrics"]["validation_auroc"] = {k: 0.99 for k in ALL_LABELS}  # the recorded list wins
    m = BundleManifest.from_json(data)
    assert m.weak_labels == (WINDOW_LABEL, "chronic_pe") and m.weak_auroc_floor == 0.8
    assert m.weak_labels_source == "manifest"
    again = BundleManifest.from_json(json.loads(json.dumps(m.to_json())))
    assert (again.weak_labels, again.weak_auroc_floor, again.weak_labels_source) == (m.weak_labels, 0.8, "manifest")
    empty = BundleManifest.from_json(_demo_manifest() | {"weak_labels": [], "weak_auroc_floor": 0.7})
    assert empty.weak_labels == () and empty.label_validation.known


@pytest.mark.parametrize("bad", [{"weak_labels": ["not_a_label"]}, {"weak_labels": "chronic_pe"},
                                 {"weak_labels": [], "weak_auroc_floor": 1.5}, {"weak_labels": [], "weak_auroc_floor": True}])
def test_bad_weak_label_fields_are_refused(bad):
    with pytest.raises(BundleError, match="weak_"):
        BundleManifest.from_json(_demo_manifest() | bad)


def test_weak_labels_below():
    auroc = {k: 0.75 for k in ALL_LABELS} | {"chronic_pe": 0.425, "rv_lv_ratio_lt_1": float("nan"),
                                             "central_pe": None}
    assert weak_labels_below(auroc) == ("chronic_pe", "central_pe", "rv_lv_ratio_lt_1")
    assert weak_labels_below(auroc, 0.8) == ALL_LABELS
    assert weak_labels_below({}, 0.0) == ALL_LABELS  # no figure: not validated
    with pytest.raises(ValueError):
        weak_labels_below(auroc, 1.2)


def test_label_validation_of_what_the_results_get():
    m = BundleManifest.from_json(_demo_manifest() | {"weak_labels": ["chronic_pe"], "weak_auroc_floor": 0.7})
    assert label_validation_of(m) == LabelValidation(("chronic_pe",), 0.7, "manifest")
    assert label_validation_of(m.to_json()) == LabelValidation(("chronic_pe",), 0.7, "manifest")
    assert label_validation_of(_older_manifest()) == LabelValidation(None, 0.7, "unknown")
    assert label_validation_of(None) == LabelValidation()
    assert label_validation_of(BundleInfo(name="x", version="1", model_uid="2.25.1")) == LabelValidation()
    assert label_validation_of({"metrics": {"validation_auroc": {k: 0.9 for k in ALL_LABELS}}}).weak == ()
