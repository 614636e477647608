"""`dicom-node analyse INPUT_DIR --out OUT_DIR`: the node's analysis on a folder, without a node or a PACS.

    dicom-node analyse /data/ctpa --out results/            # TotalSegmentator-style: folder in, folder out
    report = analyse_folder(Path("/data/ctpa"), Path("results"))   # the same as a library call

Contract:

1. Every file under INPUT_DIR (recursively, whatever its name or extension) is read with pydicom,
   header only. A file that is not DICOM, a DICOMDIR, or an instance without SeriesInstanceUID is
   skipped and listed with the reason. OUT_DIR is never read as input, even when it lies inside
   INPUT_DIR.
2. The instances are grouped by SeriesInstanceUID and each series goes through the node's own
   selection rules (`dicom_node.engine.selection.read_header` / `select_series`, with the
   `[selection]` of `--config`, else the defaults). A refused series is listed with the rule's
   reason (localizer, modality, slice thickness, ...) and does not stop the others.
3. Each selected series is analysed exactly as the node does it (`dicom_node.pipeline.get_predictor`
   with the `[inference]` settings, `analyse_series` with `ResultOptions.from_config(config.results)`;
   `kos=True` forces the Key Object Selection on). A series that fails (a gap in the slices, pixel
   data that cannot be decoded, ...) is listed with the error and does not stop the others.
4. Per analysed series, OUT_DIR/<SeriesInstanceUID>/ receives the SR (`SR.dcm`), the heatmap
   Secondary Captures (`SC_heatmap_<rank>.dcm`), the summary SC (`SC_summary.dcm`), the KOS when
   built (`KO.dcm`), all written as DICOM files (Part 10, `enforce_file_format=True`), plus the
   `dicom_node.tools.render` renderings next to them: `<name>.png` for the images, `<name>.txt`
   for the SR and KOS content trees.
5. OUT_DIR/findings.json describes every series: UIDs, selected or refused and why, per label the
   probability, threshold and call (present/absent, read back from the SR written), the key slices
   (z index, SOP Instance UID, InstanceNumber), timings and the output files; plus the bundle's
   name, version and model UID and the research-use statement.
6. Nothing goes over the network and no state database is written. OUT_DIR must be new, empty or
   an earlier analyse's output (it holds `ANALYSE_MARKER`): a re-run deletes exactly the files the
   marker lists as written by the earlier run, never anything else; any other folder is refused.

`analyse_folder` raises `AnalyseError` (one line naming the folder or setting, the value and the
fix) for bad arguments: the CLI turns that into exit status 2. The exit status is otherwise 0 when
every selected series was analysed and 1 when any selected series failed (`AnalysisReport.exit_code`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.imaging.files import SkippedFile

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicom_node.config import Config
    from dicom_node.model.inference import Predictor
    from dicom_node.results import ResultSet

__all__ = [
    "ANALYSE_MARKER",
    "FINDINGS_NAME",
    "AnalyseError",
    "AnalysisReport",
    "KeySliceRecord",
    "LabelCall",
    "SeriesReport",
    "analyse_folder",
    "main",
    "prepare_out_dir",
]

#: written into OUT_DIR first; lists (one relative path a line) every file an analyse wrote there
ANALYSE_MARKER = ".dicom-node-analyse"
#: the one summary file for all series, in OUT_DIR
FINDINGS_NAME = "findings.json"
_MARKER_HEADER = "# written by `dicom-node analyse`; a later analyse into this folder deletes the files listed below\n"
_FINDINGS_SCHEMA = 1
#: print a scan progress line every this many files
_SCAN_PROGRESS_EVERY = 500


class AnalyseError(ValueError):
    """A bad argument (input folder, output folder, config, bundle); the message names it and the fix."""


@dataclass(frozen=True)
class LabelCall:
    """One label of the SR: probability, decision threshold and the call."""

    label: str
    probability: float
    threshold: float
    call: str  # "present" or "absent"


@dataclass(frozen=True)
class KeySliceRecord:
    """One key slice: rank (0 = first to look at), slice z of the sorted series, the source instance."""

    rank: int
    z: int
    sop_instance_uid: str
    instance_number: int | None
    window_index: int
    window_probability: float
    score: float


@dataclass(frozen=True)
class SeriesReport:
    """What happened to one series: status "analysed", "refused" (selection rules) or "failed" (error)."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str
    instances: int
    status: str
    reason: str
    labels: tuple[LabelCall, ...] = ()
    key_slices: tuple[KeySliceRecord, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # relative to OUT_DIR

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = [asdict(c) for c in self.labels]
        d["key_slices"] = [asdict(k) for k in self.key_slices]
        d["outputs"] = list(self.outputs)
        return d


@dataclass(frozen=True)
class AnalysisReport:
    """The result of `analyse_folder`: every series and skipped file, the bundle, where findings.json is."""

    input_dir: Path
    out_dir: Path
    findings_path: Path
    bundle_name: str
    bundle_version: str
    model_uid: str
    execution_provider: str
    series: tuple[SeriesReport, ...]
    skipped_files: tuple[SkippedFile, ...]
    seconds: float

    def count(self, status: str) -> int:
        return sum(1 for s in self.series if s.status == status)

    @property
    def exit_code(self) -> int:
        """0 when every selected series was analysed, 1 when any selected series failed."""
        return 1 if self.count("failed") else 0


# ----------------------------------------------------------------------------- output folder


def _marker_entries(out: Path) -> list[str]:
    lines = (out / ANALYSE_MARKER).read_text().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.startswith("#")]


def _check_out_dir(out: Path) -> None:
    """Raise `AnalyseError` when `out` may not be used (a file, or a non-empty folder without the marker)."""
    if out.exists() and not out.is_dir():
        raise AnalyseError(f"--out {out} is a file, not a folder; pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / ANALYSE_MARKER).is_file():
        raise AnalyseError(f"--out {out} is not empty and was not written by an earlier analyse (no {ANALYSE_MARKER} "
                           "in it); pass a new or empty folder, nothing was deleted")


def prepare_out_dir(out: Path) -> None:
    """Make `out` ready for an analyse run, or raise `AnalyseError` without touching anything.

    A new or empty folder is used as it is. A folder holding `ANALYSE_MARKER` has the files the
    marker lists removed (and the folders that leaves empty), nothing else. Any other non-empty
    folder is refused: `--out .` must never delete a user's files.
    """
    _check_out_dir(out)
    if out.is_dir() and (out / ANALYSE_MARKER).is_file():
        root = out.resolve()
        parents: set[Path] = set()
        for rel in map(Path, _marker_entries(out)):
            p = out / rel
            # a hand-edited marker or a symlinked folder must not reach outside OUT_DIR
            if rel.is_absolute() or ".." in rel.parts or not _inside(p.parent.resolve(), root):
                continue
            if p.is_symlink() or p.is_file():
                p.unlink()  # a symlink itself, never its target
            parents.update(out / q for q in rel.parents if q != Path("."))
        for d in sorted(parents, key=lambda q: len(q.parts), reverse=True):
            if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
                d.rmdir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ANALYSE_MARKER).write_text(_MARKER_HEADER)
    except OSError as e:
        raise AnalyseError(f"--out {out}: cannot write there ({e.strerror}); pass a writable folder") from None


class _Writer:
    """Writes under OUT_DIR and records every file in the marker as it is written."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def record(self, path: Path) -> str:
        rel = path.relative_to(self.out).as_posix()
        with open(self.out / ANALYSE_MARKER, "a") as f:
            f.write(rel + "\n")
        return rel

    def dicom(self, ds: Dataset, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return self.record(path)


# ----------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class _Instance:
    path: Path
    study_uid: str
    sop_uid: str
    instance_number: int | None
    modality: str
    series_description: str


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _scan(input_dir: Path, out_dir: Path, say: Callable[[str], None]) -> tuple[dict[str, list[_Instance]], list[SkippedFile]]:
    """Read every file's header; group the instances by SeriesInstanceUID (input order: sorted paths)."""
    from dicom_node.imaging.files import read_dicom_files

    groups: dict[str, list[_Instance]] = {}
    skipped: list[SkippedFile] = []
    out_resolved = out_dir.resolve()
    items = read_dicom_files([input_dir], stop_before_pixels=True,
                             prune=lambda d: _inside(d.resolve(), out_resolved))  # never scan our own output
    for i, item in enumerate(items, 1):
        if i % _SCAN_PROGRESS_EVERY == 0:
            say(f"  scanned {i} files ...")
        if isinstance(item, SkippedFile):
            skipped.append(SkippedFile(item.path.relative_to(input_dir), item.reason))
            continue
        path, ds = item
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            skipped.append(SkippedFile(path.relative_to(input_dir), "DICOM without SeriesInstanceUID"))
            continue
        try:
            number = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        groups.setdefault(uid, []).append(_Instance(
            path=path, study_uid=str(ds.get("StudyInstanceUID", "") or ""), sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
            instance_number=number, modality=str(ds.get("Modality", "") or ""),
            series_description=str(ds.get("SeriesDescription", "") or "")))
    return groups, skipped


# ----------------------------------------------------------------------------- analysis


def _predictor(config: Config) -> Predictor:
    from dicom_node.model.bundle import BundleError
    from dicom_node.model.inference import InferenceError
    from dicom_node.pipeline import bundle_dir, predictor_for

    inf = config.inference
    try:
        return predictor_for(config)
    except (BundleError, InferenceError, OSError) as e:
        raise AnalyseError(f"model bundle {bundle_dir(inf.bundle)}: {e}") from None


def _write_series(results: ResultSet, series_dir: Path, writer: _Writer) -> list[str]:
    from dicom_node.tools.render import render_file, result_kind

    outputs = []
    for ds in results.datasets():
        name = result_kind(ds)
        dcm = series_dir / f"{name}.dcm"
        outputs.append(writer.dicom(ds, dcm))
        outputs.append(writer.record(render_file(dcm, series_dir, name)))
    return outputs


def _analyse_one(uid: str, items: list[_Instance], predictor: Predictor, config: Config, kos: bool | None,
                 writer: _Writer) -> SeriesReport:
    from dicom_node.engine.selection import SelectionDecision, read_header, select_series
    from dicom_node.labels import ALL_LABELS
    from dicom_node.pipeline import analyse_series
    from dicom_node.results import ResultOptions
    from dicom_node.tools.demo import read_findings

    first = items[0]
    base = SeriesReport(study_instance_uid=first.study_uid, series_instance_uid=uid, modality=first.modality,
                        series_description=first.series_description, instances=len(items), status="refused",
                        reason="")
    paths = [i.path for i in items]
    try:
        decision = select_series(read_header(paths), config.selection)
    except Exception as e:  # the node skips a series whose header it cannot read, with the reason
        decision = SelectionDecision(False, f"header unreadable: {type(e).__name__}: {str(e)[:120]}")
    if not decision.selected:
        return replace(base, reason=decision.reason)
    options = ResultOptions.from_config(config.results)
    if kos is not None:
        options = replace(options, kos=kos)
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    try:
        results = analyse_series(paths, predictor, options, mark=lambda stage: marks.__setitem__(stage, time.perf_counter() - t0))
        built = time.perf_counter() - t0
        outputs = _write_series(results, writer.out / uid, writer)
    except Exception as e:  # one failed series must not stop the others
        return replace(base, status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
    total = time.perf_counter() - t0
    pre, inf = marks.get("preprocessed", 0.0), marks.get("inferred", 0.0)
    timings = {"load_and_preprocess": pre, "inference": inf - pre, "results": built - inf, "write": total - built,
               "total": total}
    found = read_findings(results.sr)
    labels = tuple(LabelCall(lb, found[lb].probability, found[lb].threshold, "present" if found[lb].present else "absent")
                   for lb in ALL_LABELS if lb in found)
    numbers = {i.sop_uid: i.instance_number for i in items}
    keys = tuple(KeySliceRecord(rank=k.rank, z=k.z, sop_instance_uid=k.sop_instance_uid,
                                instance_number=numbers.get(k.sop_instance_uid), window_index=k.window_index,
                                window_probability=round(float(k.window_probability), 6), score=round(float(k.score), 6))
                 for k in results.key_slices)
    return replace(base, status="analysed", reason=decision.reason, labels=labels, key_slices=keys,
                   timings_s={k: round(v, 3) for k, v in timings.items()}, outputs=tuple(outputs))


def _verdict(s: SeriesReport) -> str:
    if s.status != "analysed":
        return f"{s.status}: {s.reason}"
    window = next((c for c in s.labels if c.label == "pe_present_on_window"), None)
    call = ("PE flagged" if window.call == "present" else "no PE flagged") if window else "no window label in the SR"
    detail = f" (p={window.probability:.3f}, threshold {window.threshold:.3f})" if window else ""
    return f"analysed in {s.timings_s.get('total', 0.0):.1f} s: {call}{detail}"


def _findings_json(report: AnalysisReport, config: Config, kos: bool | None) -> dict[str, Any]:
    return {
        "schema_version": _FINDINGS_SCHEMA,
        "tool": "dicom-node analyse",
        "research_use": RESEARCH_USE_STATEMENT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input_dir": str(report.input_dir),
        "bundle": {"name": report.bundle_name, "version": report.bundle_version, "model_uid": report.model_uid,
                   "execution_provider": report.execution_provider},
        "selection": asdict(config.selection),
        "kos": config.results.send_kos if kos is None else kos,
        "summary": {"series": len(report.series), "analysed": report.count("analysed"),
                    "refused": report.count("refused"), "failed": report.count("failed"),
                    "skipped_files": len(report.skipped_files), "seconds": round(report.seconds, 3)},
        "series": [s.to_json() for s in report.series],
        "skipped_files": [{"path": f.path.as_posix(), "reason": f.reason} for f in report.skipped_files],
    }


def analyse_folder(input_dir: Path, out_dir: Path, *, config: Config | None = None, kos: bool | None = None,
                   progress: Callable[[str], None] | None = None) -> AnalysisReport:
    """Analyse every CT series under `input_dir` into `out_dir` (see module docstring).

    `config` gives the selection rules, the inference settings (bundle, providers, ...) and the
    `[results]` numbering (default: `load_config()`'s defaults); `kos` True/False overrides
    `results.send_kos`. `progress` receives one line per step (default: silent).
    Raises `AnalyseError` for bad arguments; a refused or failed series is in the report instead.
    """
    from dicom_node.config import load_config

    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    config = config or load_config()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not input_dir.is_dir():
        what = "is a file, not a folder" if input_dir.exists() else "does not exist"
        raise AnalyseError(f"INPUT_DIR {input_dir} {what}; pass the folder holding the DICOM files")
    if _inside(input_dir.resolve(), out_dir.resolve()):
        raise AnalyseError(f"--out {out_dir} holds INPUT_DIR {input_dir}; pass an output folder outside the input")
    _check_out_dir(out_dir)  # before the scan, which can take a while on a large folder
    say(f"dicom-node analyse — {RESEARCH_USE_STATEMENT}")
    say(f"scanning {input_dir} ...")
    groups, skipped = _scan(input_dir, out_dir, say)
    if not groups:
        why = f"{len(skipped)} files read, none is a DICOM instance" if skipped else "the folder holds no files"
        raise AnalyseError(f"INPUT_DIR {input_dir}: no DICOM found ({why}); pass the folder holding the DICOM files")
    n_files = sum(len(v) for v in groups.values())
    say(f"found {_plural(n_files, 'DICOM instance')} in {len(groups)} series ({_plural(len(skipped), 'file')} skipped)")
    predictor = _predictor(config)  # a broken bundle is a bad argument: refused before OUT_DIR is touched
    prepare_out_dir(out_dir)
    m = predictor.manifest
    say(f"model '{m.name}' {m.version} on {predictor.execution_provider}")
    writer = _Writer(out_dir)
    reports = []
    for n, (uid, items) in enumerate(groups.items(), 1):
        items.sort(key=lambda i: i.path)
        first = items[0]
        say(f"[{n}/{len(groups)}] series {uid} ({first.modality or '?'}, {_plural(len(items), 'instance')}"
            f"{', ' + repr(first.series_description) if first.series_description else ''}) ...")
        rep = _analyse_one(uid, items, predictor, config, kos, writer)
        say(f"      {_verdict(rep)}")
        reports.append(rep)
    report = AnalysisReport(input_dir=input_dir, out_dir=out_dir, findings_path=out_dir / FINDINGS_NAME,
                            bundle_name=m.name, bundle_version=m.version, model_uid=m.model_uid,
                            execution_provider=predictor.execution_provider, series=tuple(reports),
                            skipped_files=tuple(skipped), seconds=time.perf_counter() - t0)
    report.findings_path.write_text(json.dumps(_findings_json(report, config, kos), indent=2) + "\n")
    writer.record(report.findings_path)
    return report


# ----------------------------------------------------------------------------- command line


def _config(path: str, bundle: str) -> Config:
    from dicom_node.config import ConfigError, load_config

    if bundle and not Path(bundle).expanduser().is_dir():
        raise AnalyseError(f"--bundle {bundle}: not a folder; pass a model bundle directory (as written by "
                           "`dicom-node-export bundle`) or leave --bundle out for the bundled demo model")
    try:
        return load_config(path or None, overrides={"inference.bundle": bundle or None})
    except ConfigError as e:
        where = f"--config {path}" if path else "configuration (DICOM_NODE_* environment variables)"
        raise AnalyseError(f"{where}: {e}") from None


def run(args: argparse.Namespace) -> int:
    """The CLI body for parsed arguments (input, out, bundle, config, kos, verbose); returns the exit status."""
    from dicom_node.log import configure_logging

    configure_logging(json=False, level="INFO" if args.verbose else "WARNING")
    try:
        config = _config(args.config, args.bundle)
        report = analyse_folder(Path(args.input), Path(args.out), config=config, kos=True if args.kos else None,
                                progress=lambda line: print(line, flush=True))
    except AnalyseError as e:
        print(f"dicom-node analyse: {e}", file=sys.stderr)
        return 2
    for f in report.skipped_files[:10]:
        print(f"  skipped file {f.path}: {f.reason}")
    if len(report.skipped_files) > 10:
        print(f"  ... {len(report.skipped_files) - 10} more skipped files listed in {report.findings_path}")
    print(f"\n{report.count('analysed')} series analysed, {report.count('refused')} refused by the selection rules, "
          f"{report.count('failed')} failed, in {report.seconds:.1f} s; findings: {report.findings_path}")
    if report.count("failed"):
        for s in report.series:
            if s.status == "failed":
                print(f"dicom-node analyse: series {s.series_instance_uid} failed: {s.reason}", file=sys.stderr)
    elif not report.count("analysed"):
        print(f"dicom-node analyse: no series under {report.input_dir} met the selection rules (reasons in "
              f"{report.findings_path}); adjust [selection] in --config to analyse them", file=sys.stderr)
    return report.exit_code


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `analyse` on a `dicom-node` subparsers object."""
    p = subparsers.add_parser(
        "analyse",
        help="analyse every CT series in a folder, no node or PACS: SR, heatmaps, PNGs and findings.json",
        description=(
            "Analyse DICOM files from a folder the way the node analyses studies it receives, without a\n"
            "running node, a PACS or a network:\n"
            "  1. every file under INPUT_DIR is read by content (any name or extension); files that are\n"
            "     not DICOM are skipped and listed with the reason;\n"
            "  2. the instances are grouped by SeriesInstanceUID and each series passes the node's\n"
            "     selection rules ([selection] of --config); a refused series (localizer, thick slices,\n"
            "     not CT, ...) is listed with the rule's reason;\n"
            "  3. each selected series is analysed by the model and gets OUT_DIR/<SeriesInstanceUID>/ with\n"
            "     SR.dcm, SC_heatmap_<n>.dcm, SC_summary.dcm (and KO.dcm with --kos), each with a .png\n"
            "     or .txt rendering;\n"
            "  4. OUT_DIR/findings.json lists every series: labels, probabilities, thresholds, calls,\n"
            "     key slices, timings, output files, refusals and errors.\n"
            "Exit status: 0 when every selected series was analysed, 1 when one failed (the others are\n"
            "still analysed), 2 for bad arguments. OUT_DIR must be new, empty or the output of an earlier\n"
            "analyse: only that run's files are replaced, a user's files are never deleted.\n"
            "Research use only: results must be confirmed by a qualified radiologist."),
        epilog=("examples:\n"
                "  dicom-node analyse /data/ctpa --out pe-results\n"
                "  dicom-node analyse /data/ctpa -o pe-results --kos --config node.toml\n"
                "  dicom-node analyse /data/ctpa -o pe-results --bundle /models/pe-v3   # another model bundle\n"
                "  python -m json.tool pe-results/findings.json"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT_DIR", help="folder with the DICOM files (searched recursively, any file names)")
    p.add_argument("--out", "-o", required=True, metavar="OUT_DIR",
                   help="output folder: new, empty or written by an earlier analyse (its files are replaced)")
    p.add_argument("--bundle", default="", metavar="DIR",
                   help="model bundle (default: inference.bundle of --config, else the bundled demo model)")
    p.add_argument("--config", default="", metavar="FILE",
                   help="node TOML config: [selection] rules, [inference] settings, [results] numbering "
                        "(default: built-in defaults and DICOM_NODE_* environment variables)")
    p.add_argument("--kos", action="store_true",
                   help="also write the Key Object Selection (default: results.send_kos of the config, off)")
    p.add_argument("--verbose", action="store_true", help="show the library's log events")
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dicom_node.tools.analyse INPUT_DIR --out OUT_DIR` (the same as `dicom-node analyse`)."""
    parser = argparse.ArgumentParser(prog="dicom-node")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyse", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
