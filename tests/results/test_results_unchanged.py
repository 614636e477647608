"""The results of one phantom study, element by element, are what the release before the layout move built.

`data/phantom_results.json.gz` was written from the flat-module code (before `dicom_node` was cut
into stage sub-packages) by `fingerprint` below: every element of every object (SR, heatmap SCs,
summary SC, KOS; revision 0 and a revision-1 SR with its predecessor), UIDs included, pixel data
as sha256, creation dates and times aside. A change that alters any result object fails here;
when the change is meant (a new SR layout, a new heatmap mapping), rewrite the file with
`python tests/results/test_results_unchanged.py --rewrite` and say why in the commit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

GOLDEN = Path(__file__).parent / "data" / "phantom_results.json.gz"

#: creation dates and times: the only elements allowed to differ between two builds of the same input
CREATION_KEYWORDS = frozenset({
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "SeriesDate", "SeriesTime",
    "DateTime", "ObservationDateTime", "AcquisitionDateTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture",
    "ContentCreationDate", "ContentCreationTime", "ContributionDateTime",
})


def fingerprint(ds: Dataset) -> list:
    """[tag, VR, value] for every element, sequences recursively, bytes as sha256."""
    out: list = []
    for elem in ds:
        if elem.keyword in CREATION_KEYWORDS:
            continue
        tag = f"{elem.tag.group:04X}{elem.tag.element:04X}"
        if isinstance(elem.value, Sequence):
            out.append([tag, elem.VR, [fingerprint(item) for item in elem.value]])
        elif isinstance(elem.value, (bytes, bytearray)):
            out.append([tag, elem.VR, "sha256:" + hashlib.sha256(elem.value).hexdigest()])
        else:
            out.append([tag, elem.VR, repr(elem.value)])
    return out


def build(tmp: Path) -> dict[str, list]:
    """The fingerprints of the demo model's results for the demo's positive phantom."""
    from dicom_node.pipeline import analyse_series, get_predictor
    from dicom_node.results import ResultOptions
    from dicom_node.tools.demo import DEMO_PHANTOM
    from dicom_node_phantoms import PhantomConfig, generate_study, write_study

    study = generate_study(20261125, PhantomConfig(**DEMO_PHANTOM), kind="positive")
    predictor = get_predictor(intra_op_threads=1)
    files = write_study(study, tmp / "study")
    desc = "PE detection (research use only)"
    node = dict(key_slices=3, sr_series_number=9901, sr_series_description=desc, sc_series_number=9902,
                sc_series_description=f"{desc} - heatmaps", kos_series_number=9903,
                kos_series_description=f"{desc} - key images")
    out = {}
    for name, opts, prev in (("revision0", ResultOptions(revision=0, kos=True, summary=True, **node), None),
                             ("revision1", ResultOptions(revision=1, kos=False, summary=False, **node), "1.2.3.4.5")):
        results = analyse_series(files, predictor, opts, predecessor_sr_uid=prev)
        out[name] = [fingerprint(ds) for ds in results.datasets()]
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from the file


def _first_difference(a, b, path: str = "") -> str:
    if type(a) is not type(b) or not isinstance(a, list):
        return f"{path}: {a!r} != {b!r}"
    if len(a) != len(b):
        return f"{path}: {len(a)} items != {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            name = x[0] if isinstance(x, list) and x and isinstance(x[0], str) else i
            return _first_difference(x, y, f"{path}/{name}")
    return path


def test_results_of_one_phantom_study_are_unchanged(tmp_path):
    expected = json.loads(gzip.decompress(GOLDEN.read_bytes()))
    got = build(tmp_path)
    assert got.keys() == expected.keys()
    for name in expected:
        assert len(got[name]) == len(expected[name]), f"{name}: object count changed"
        for i, (g, e) in enumerate(zip(got[name], expected[name])):
            assert g == e, f"{name} object {i} differs at {_first_difference(g, e)}"


if __name__ == "__main__" and sys.argv[1:] == ["--rewrite"]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_bytes(gzip.compress(json.dumps(build(Path(d))).encode(), 9))
    print(f"wrote {GOLDEN}")
