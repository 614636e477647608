"""`dicom-node demo`: the whole product on two synthetic studies, start to finish.

1. generates a PE-positive and a PE-negative synthetic CTPA study (dicom_node_phantoms.study: numpy and
   pydicom only, no torch);
2. starts a receiving PACS: a real Orthanc when it is installed, else a storage SCP of our own;
3. starts the node with the bundled demo model (or `--bundle`), sending results to that PACS;
4. sends both studies to the node by C-STORE, like a scanner would;
5. waits for the SRs and heatmap images to arrive in the PACS, reads the findings back from the
   received SRs and prints them as a table, writes the heatmap Secondary Captures as PNG files;
6. with `--worklist`: keeps the node running with its web worklist on 127.0.0.1 and prints the URL
   and a one-time login (user `demo`, a random password), until Ctrl-C (or `--worklist-for`);
7. shuts everything down.

The demo model was trained on synthetic phantoms only: research use, never on patients.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.labels import ALL_LABELS
from dicom_node.log import configure_logging, get_logger
from dicom_node.results.codes import (
    COMMENT,
    FINDING,
    FINDING_GROUPS,
    LABEL_CODING,
    PROBABILITY,
    THRESHOLD,
    TRACKING_IDENTIFIER,
    same_code,
)
from dicom_node.results.sr import labels_not_validated

if TYPE_CHECKING:
    from dicom_node.tools.pacs import LocalStorageScp, OrthancPeer

__all__ = ["DEMO_MARKER", "DEMO_PHANTOM", "DemoStudy", "Finding", "prepare_output_dir", "read_findings", "run_demo"]

log = get_logger("dicom_node.tools.demo")

#: phantom geometry and embolus sites the bundled demo model was trained on (dicom_node/model/README.md,
#: `benchmarks/train_phantom.py`'s defaults: 128 px, 140 slices of 2.5 mm, emboli in the main, left and right
#: pulmonary arteries in 4 mm of mediastinal fat), so the demo shows the model on the data it knows
DEMO_PHANTOM: dict[str, Any] = {"rows": 128, "cols": 128, "n_slices": 140, "slice_thickness_mm": 2.5,
                "smallest_embolus_vessel": "central", "mediastinal_fat_mm": 4.0}


@dataclass(frozen=True)
class DemoStudy:
    name: str
    study_uid: str
    series_uid: str
    files: tuple[Path, ...]
    truth_positive: bool


@dataclass(frozen=True)
class Finding:
    """One label of a received SR: probability, threshold, the present/absent call, and whether the SR marks
    the label "low confidence, not validated" (the bundle's validation AUROC below its floor)."""

    label: str
    probability: float
    threshold: float
    present: bool
    validated: bool = True


def read_findings(sr: Dataset) -> dict[str, Finding]:
    """Read our TID 1500 SR back: one `Finding` per label, by `dicom_node.results.codes.LABEL_CODING`.

    Only the finding groups count (Tracking Identifier one of `FINDING_GROUPS`); in each, a label's
    Probability / Threshold Value NUMs are the ones with its HAS CONCEPT MOD (none for the group's
    main label), and it is present when the group holds its `present` CODE item. A label is read only
    when the SR reports its probability (a Shi et al. 2020 bundle reports the PE finding alone, and
    the labels sharing its finding code are then absent, not "present: no, probability unknown").
    """
    found: dict[str, Finding] = {}
    trackers = {tracking for tracking, _ in FINDING_GROUPS.values()}

    def codes_of(item: Dataset) -> tuple[Dataset, Dataset] | None:
        if item.get("ValueType") != "CODE" or "ConceptCodeSequence" not in item:
            return None
        return item.ConceptNameCodeSequence[0], item.ConceptCodeSequence[0]

    def is_pair(pair: tuple[Dataset, Dataset] | None, name: Code, value: Code) -> bool:
        return pair is not None and same_code(pair[0], name) and same_code(pair[1], value)

    def read_group(group: list[Dataset]) -> None:
        finding = next((p[1] for p in map(codes_of, group) if p is not None and same_code(p[0], FINDING)), None)
        if finding is None:
            return
        codes_here = [codes_of(c) for c in group]
        weak = {label for c in group if c.get("ValueType") == "TEXT" and same_code(c.ConceptNameCodeSequence[0], COMMENT)
                for label in labels_not_validated(str(c.TextValue))}
        for label, coding in LABEL_CODING.items():
            if not same_code(finding, coding.finding):
                continue
            nums: dict[str, float] = {}
            for c in group:
                if c.get("ValueType") != "NUM" or not c.get("MeasuredValueSequence"):
                    continue
                mods = [codes_of(m) for m in c.get("ContentSequence", []) if m.get("RelationshipType") == "HAS CONCEPT MOD"]
                mods = [m for m in mods if m is not None]
                matches = (not mods) if coding.modifier is None else any(is_pair(m, *coding.modifier) for m in mods)
                if matches:
                    nums[str(c.ConceptNameCodeSequence[0].CodeValue)] = float(c.MeasuredValueSequence[0].NumericValue)
            if PROBABILITY.value not in nums:  # labels sharing this finding code that the SR does not report
                continue
            present = any(is_pair(p, *coding.present) for p in codes_here)
            found[label] = Finding(label, nums[PROBABILITY.value], nums.get(THRESHOLD.value, float("nan")), present,
                                   validated=label not in weak)

    def walk(items: Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "CONTAINER" and "ContentSequence" in item:
                group = list(item.ContentSequence)
                label = next((str(c.TextValue) for c in group if c.get("ValueType") == "TEXT"
                              and str(c.ConceptNameCodeSequence[0].CodeValue) == TRACKING_IDENTIFIER.value), None)
                if label in trackers:
                    read_group(group)
                else:
                    walk(group)

    walk(sr.ContentSequence)
    return found


def _make_studies(out: Path) -> list[DemoStudy]:
    from dicom_node_phantoms import PhantomConfig, generate_study, write_study  # numpy + pydicom only

    cfg = PhantomConfig(**DEMO_PHANTOM)
    studies = []
    for name, seed, kind in (("positive", 20261125, "positive"), ("negative", 20261126, "negative")):
        st = generate_study(seed, cfg, kind=kind)
        # the demo shows a typical case: a positive study with a central embolus (the first such seed)
        while kind == "positive" and not st.study_labels["central_pe"]:
            seed += 2
            st = generate_study(seed, cfg, kind=kind)
        files = write_study(st, out / name)
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        studies.append(DemoStudy(name, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), tuple(files),
                                 kind == "positive"))
    return studies


class _Pacs:
    """The receiving PACS of the demo: Orthanc when installed, else our own storage SCP."""

    def __init__(self, workdir: Path, node_port: int, prefer_orthanc: bool = True) -> None:
        from dicom_node.tools.pacs import ORTHANC_BIN, LocalStorageScp, OrthancPeer

        self.orthanc: OrthancPeer | None = None
        self.local: LocalStorageScp | None = None
        if prefer_orthanc and ORTHANC_BIN:
            self.kind = "Orthanc"
            self.orthanc = OrthancPeer(workdir / "orthanc", node_port=node_port).start()
            self.port, self.aet = self.orthanc.dicom_port, self.orthanc.aet
        else:
            self.kind = "built-in storage SCP"
            self.local = LocalStorageScp(workdir / "pacs")
            self.local.start()
            self.port, self.aet = self.local.port, self.local.aet

    def received(self) -> list[Dataset]:
        if self.orthanc is not None:
            from io import BytesIO
            out: list[Dataset] = []
            for oid in self.orthanc.instances():
                tags = self.orthanc.instance_tags(oid)
                if tags.get("Modality") in ("SR", "OT", "KO"):
                    out.append(pydicom.dcmread(BytesIO(self.orthanc.instance_file(oid))))
            return out
        assert self.local is not None
        return [pydicom.dcmread(p) for p in self.local.files()]

    def stop(self) -> None:
        (self.orthanc or self.local).stop()  # type: ignore[union-attr]  # exactly one of them is set


def _wait_for_srs(pacs: _Pacs, studies: list[DemoStudy], timeout_s: float) -> list[Dataset]:
    deadline = time.monotonic() + timeout_s
    wanted = {s.study_uid for s in studies}
    while True:
        got = pacs.received()
        have = {str(d.StudyInstanceUID) for d in got if d.SOPClassUID == Comprehensive3DSRStorage}
        scs = [d for d in got if d.SOPClassUID == SecondaryCaptureImageStorage]
        if wanted <= have and len(scs) >= 2 * len(studies):
            time.sleep(1.0)  # let the last images of the batch land
            return pacs.received()
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: results for {len(wanted - have)} of {len(wanted)} studies did not arrive in "
                               f"{timeout_s:.0f} s; see the node log above")
        time.sleep(0.5)


def _print_findings(studies: list[DemoStudy], results: list[Dataset]) -> dict[str, dict[str, Finding]]:
    by_study: dict[str, dict[str, Finding]] = {}
    for s in studies:
        sr = next(d for d in results if d.SOPClassUID == Comprehensive3DSRStorage and str(d.StudyInstanceUID) == s.study_uid)
        by_study[s.name] = read_findings(sr)
    names = [s.name for s in studies]
    print()
    print(f"{'label':<22}" + "".join(f"{n + ' (truth ' + ('PE' if s.truth_positive else 'no PE') + ')':>34}"
                                    for n, s in zip(names, studies)))
    # the labels the bundle reports (all ten for a Ma bundle; PE present alone for a shi2020 one)
    reported = [label for label in ALL_LABELS
                if any(f is not None and not math.isnan(f.probability) for f in (by_study[n].get(label) for n in names))]
    for label in reported or ALL_LABELS:
        row = f"{label:<22}"
        for n in names:
            f = by_study[n].get(label)
            cell = "missing" if f is None else f"p={f.probability:.3f} t={f.threshold:.3f} {'PRESENT' if f.present else 'absent'}"
            row += f"{cell:>34}"
        print(row)
    print()
    for s in studies:
        f = by_study[s.name].get("pe_present_on_window")
        verdict = "PE FLAGGED" if f and f.present else "no PE flagged"
        print(f"  {s.name} study {s.study_uid}: {verdict} (truth: {'PE' if s.truth_positive else 'no PE'})")
    return by_study


def _serve_worklist(node: Any, password: str, seconds: float) -> None:
    """Keep the node (and its worklist) running until Ctrl-C, or for `seconds` when > 0."""
    url = f"http://127.0.0.1:{node.metrics_port}/worklist"
    print(f"\nworklist: {url}")
    print(f"log in as: demo / {password}   (a one-time demo login; it ends with this demo)")
    print("the positive study is ranked first; open it for the heatmap previews. "
          + (f"Stopping in {seconds:g} s." if seconds > 0 else "Stop with Ctrl-C."), flush=True)
    deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
    # Ctrl-C (and a SIGTERM from systemd, `timeout` or `kill`) ends the wait and the demo cleans up. Set here
    # because a demo started in the background of a script inherits SIGINT ignored (POSIX shells ignore it
    # in asynchronous commands), and then Ctrl-C or `kill -INT` did nothing for --worklist-for seconds.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _interrupt)
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


#: written into every demo output folder: only a folder holding it is ever emptied by a later demo
DEMO_MARKER = ".dicom-node-demo"
#: what the demo writes into its output folder (and so the only entries a re-run removes)
DEMO_OUTPUTS = ("results", "rendered")


def prepare_output_dir(out: Path) -> str | None:
    """Make `out` ready for a demo run; return why not (one line naming the folder and the fix), or None.

    A new or empty folder is used as it is. A folder that holds `DEMO_MARKER` (written by an earlier
    demo) has that demo's `results/` and `rendered/` removed, nothing else. Any other folder is
    refused untouched: `--out .` must never delete a user's files.
    """
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder; pass a new or empty folder (default demo-output)"
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            return (f"--out {out} is not empty and was not written by an earlier demo (no {DEMO_MARKER} in it); "
                    "pass a new or empty folder, nothing was deleted")
        for name in DEMO_OUTPUTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `dicom-node demo`; a later demo run replaces results/ and rendered/\n")
    return None


def run_demo(out_dir: Path | None = None, *, bundle: str = "", prefer_orthanc: bool = True,
             quiet_period_s: float = 2.0, timeout_s: float = 240.0, verbose: bool = False, worklist: bool = False,
             worklist_for_s: float = 0.0) -> int:
    """Run the demo (see module docstring); return 0 when the results of both studies came back.

    Whether the model's calls match the phantoms' truth is printed, not turned into the exit status:
    the demo checks the product (DICOM in, results back), `benchmarks/train_phantom.py` the model.
    """
    from dicom_node.config import Destination, load_config
    from dicom_node.engine.node import Node
    from dicom_node.network.send import send_files
    from dicom_node.tools.pacs import free_port
    from dicom_node.tools.render import render_file, result_kind

    t0 = time.perf_counter()
    configure_logging(json=False, level="INFO" if verbose else "WARNING")
    out = Path(out_dir) if out_dir else Path("demo-output")
    refusal = prepare_output_dir(out)
    if refusal:
        print(f"dicom-node demo: {refusal}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
    print(f"dicom-node demo — {RESEARCH_USE_STATEMENT}")
    print("[1/5] generating a PE-positive and a PE-negative synthetic CTPA study ...", flush=True)
    studies = _make_studies(work / "studies")
    print(f"      {sum(len(s.files) for s in studies)} CT images written ({time.perf_counter() - t0:.1f} s)")

    node_port = free_port()
    pacs = _Pacs(work, node_port, prefer_orthanc)
    node = None
    try:
        print(f"[2/5] receiving PACS: {pacs.kind} ({pacs.aet}@127.0.0.1:{pacs.port})")
        web: dict[str, Any] = {}
        password = ""
        if worklist:  # a one-time user: the password exists only in this process and on the screen
            import secrets

            from dicom_node.web.auth import hash_password

            password = secrets.token_urlsafe(9)
            web = {"metrics_port": free_port(), "metrics_host": "127.0.0.1", "web.enabled": True,
                   "web.users": [f"demo:{hash_password(password)}"], "web.refresh_s": 10}
        config = load_config(overrides={
            "ae_title": "PENODE", "host": "127.0.0.1", "port": node_port, "data_dir": str(work / "node-data"),
            "quiet_period_s": quiet_period_s, "min_free_disk_mb": 64, "inference.bundle": bundle,
            "results.send_kos": True, "log.json": False, **web,
        })
        config = replace(config, destinations=(Destination(pacs.aet, "127.0.0.1", pacs.port),))
        node = Node(config).start()
        from dicom_node.pipeline import predictor_for
        predictor = predictor_for(config)  # the node's own (cached): the model is loaded once
        m = predictor.manifest
        print(f"[3/5] node PENODE@127.0.0.1:{node.port} running model '{m.name}' {m.version} "
              f"on {predictor.execution_provider}")
        print("[4/5] sending both studies to the node by C-STORE ...", flush=True)
        for s in studies:
            res = send_files(s.files, Destination("PENODE", "127.0.0.1", node.port), calling_aet="DEMOSCU")
            print(f"      {s.name}: {res.sent} instances stored in {res.seconds:.1f} s")
        print(f"[5/5] waiting for results (series complete after {quiet_period_s:g} s of quiet) ...", flush=True)
        results = _wait_for_srs(pacs, studies, timeout_s)
        by_study = _print_findings(studies, results)
        res_dir = out / "results"
        res_dir.mkdir()
        study_name = {s.study_uid: s.name for s in studies}
        rendered: list[Path] = []
        for d in results:
            path = res_dir / f"{d.Modality}_{d.SOPInstanceUID}.dcm"
            d.save_as(path, enforce_file_format=True)
            # named for a person opening the folder, as `analyse` names them: positive_SR.txt, positive_SC_heatmap_1.png
            stem = f"{study_name.get(str(d.StudyInstanceUID), 'other')}_{result_kind(d)}"
            if any(p.stem == stem for p in rendered):  # a second object of that kind (a revision): keep both
                stem = f"{stem}_{d.SOPInstanceUID}"
            rendered.append(render_file(path, out / "rendered", stem))
        print(f"\nresults received by the PACS: {len(results)} objects, saved under {res_dir}")
        print(f"heatmap and summary images as PNG, each SR and key-image list as text, under {out / 'rendered'}:")
        for p in sorted(rendered):
            print(f"  {p}")
        ok = (by_study["positive"]["pe_present_on_window"].present
              and not by_study["negative"]["pe_present_on_window"].present)
        verdict = ("the model's calls match the truth: positive study flagged, negative study cleared" if ok else
                   "the model's calls do NOT match the truth for both studies (a small phantom-trained model "
                   "misses some studies: see dicom_node/model/README.md for its measured quality)")
        print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s: results for both studies came back; {verdict}")
        if worklist:
            _serve_worklist(node, password, worklist_for_s)
        return 0
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
        shutil.rmtree(work, ignore_errors=True)
