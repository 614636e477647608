"""The worklist's study page says what the SR says, on a real node running the product pipeline over real
HTTP: findings by their clinical names, and a label the bundle could not validate (validation AUROC below
its floor) marked "low confidence, not validated" there as in the SR and on the heatmaps."""

from __future__ import annotations

import pydicom

from bundle_factory import build_tiny_bundle
from dicom_node.engine.node import default_job_body
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL
from nodekit import phantom_series, storescu, wait_until
from peers import free_port, needs_dcmtk
from webkit import WebClient, web_config

pytestmark = needs_dcmtk


def test_a_label_the_bundle_could_not_validate_is_marked_not_validated_on_the_study_page(make_node, tmp_path):
    validation = {label: 0.9 for label in (WINDOW_LABEL, *STUDY_LABELS)} | {"chronic_pe": 0.5}
    bundle = build_tiny_bundle(tmp_path / "bundle", thresholds={k: 0.5 for k in validation},
                               metrics={"data": "random weights, no data", "test_auroc": {},
                                        "validation_auroc": validation})
    http = free_port()
    node = make_node([], run_job=default_job_body(),
                     **web_config(http, users=("alice",), **{"inference.bundle": str(bundle.path)}))
    files = phantom_series(tmp_path / "in", n_slices=40, rows=64)
    r = storescu(node.port, files)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    wait_until(lambda: [j for j in node.state.jobs() if j.state.value == "done"], 120, "job done")
    c = WebClient(http)
    assert c.login("alice").status == 303
    page = c.get(f"/studies/{pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID}").text
    rows = {row.split("</td>")[0] for row in page.split('<tr class="')[1:] if "label-id" in row}
    weak = [row for row in rows if 'label-id">chronic_pe<' in row]
    assert len(weak) == 1 and "low confidence, not validated" in weak[0]
    assert sum("not-validated" in row for row in rows) == 1  # the validated labels are not marked
    assert "Chronic PE" in weak[0]
