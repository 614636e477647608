"""The demo bundle shipped in the package: found without configuration, verified, and it works on phantoms.

A missing demo bundle fails the suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.model import builtin_bundle_path
from dicom_node.model.bundle import default_bundle_path, load_bundle, verify_bundle

DEMO = default_bundle_path()



@pytest.mark.parametrize("name, family", [("ma2022", "ma2022"), ("shi2020", "shi2020")])
def test_each_shipped_bundle_is_inside_the_package_and_verifies(name, family):
    import dicom_node

    path = Path(builtin_bundle_path(f"builtin:{name}"))
    if name == "ma2022":
        assert path == DEMO  # the default bundle is the Ma family's
    assert path.resolve().is_relative_to(Path(dicom_node.__file__).resolve().parent)
    report = verify_bundle(path, run_graphs=True)
    assert set(report.files_checked) >= {"stage1.onnx", "stage2.onnx", "MODEL_CARD.md"}
    assert load_bundle(path).manifest.family == family
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    assert size <= 20 * 1024 * 1024, f"shipped bundle {name} is {size / 1e6:.1f} MB; the package limit is 20 MB"
    card = (path / "MODEL_CARD.md").read_text()
    assert "synthetic" in card and "must never be used on patients" in card


@pytest.mark.parametrize("kind, positive", [("positive", True), ("negative", False)])
def test_demo_model_flags_positive_and_clears_negative_phantom(tmp_path, kind, positive):
    from dicom_node.imaging.preprocess import preprocess
    from dicom_node.imaging.series import load_series
    from dicom_node.model.inference import Predictor
    from dicom_node.tools.demo import DEMO_PHANTOM
    from dicom_node_phantoms import PhantomConfig, generate_study, study_seed, write_study

    bundle = load_bundle(DEMO)
    study = generate_study(study_seed(424242, 0 if positive else 1), PhantomConfig(**DEMO_PHANTOM), kind=kind)
    write_study(study, tmp_path)
    series = load_series(tmp_path)
    windows = preprocess(series, bundle.manifest.preprocessing)
    pred = Predictor(bundle, providers=("CPUExecutionProvider",)).predict(windows)
    assert pred.positive is positive, (kind, pred.window_probs.max(), pred.study_probs)
    if positive:
        assert not (pred.labels["negative_exam_for_pe"] or pred.labels["indeterminate"])
    else:
        assert not any(pred.labels[k] for k in ("central_pe", "leftsided_pe", "rightsided_pe"))
