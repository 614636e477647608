"""Look at result objects without a viewer: PNG for images, indented text for SR and KOS.

    dicom-node render results/*.dcm --out rendered/

An image (e.g. a heatmap Secondary Capture) becomes `<SOPInstanceUID>.png` (RGB as is,
greyscale through its window or min-max); an SR or KOS becomes `<SOPInstanceUID>.txt`, its
content tree one item per line: relationship, value type, concept name (code), value
(codes with scheme, numbers with units, image references with SOP UIDs).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["render_sr_text", "render_image", "render_file", "render_files", "result_kind"]


def _code(item: Dataset | None) -> str:
    if item is None:
        return "?"
    return f"{item.get('CodeMeaning', '?')} ({item.get('CodeValue', '?')}, {item.get('CodingSchemeDesignator', '?')})"


def _value(item: Dataset) -> str:
    vt = item.get("ValueType", "")
    if vt == "CODE":
        return _code(item.ConceptCodeSequence[0])
    if vt == "NUM":
        mv = item.MeasuredValueSequence[0] if item.get("MeasuredValueSequence") else None
        if mv is None:
            return "(no value)"
        unit = mv.MeasurementUnitsCodeSequence[0]
        return f"{mv.NumericValue} [{unit.CodeValue}]"
    if vt in ("TEXT", "UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
        key = {"TEXT": "TextValue", "UIDREF": "UID", "DATETIME": "DateTime", "DATE": "Date", "TIME": "Time",
               "PNAME": "PersonName"}[vt]
        return f'"{item.get(key, "")}"'
    if vt in ("IMAGE", "COMPOSITE"):
        ref = item.ReferencedSOPSequence[0]
        return f"SOP {ref.ReferencedSOPInstanceUID} (class {ref.ReferencedSOPClassUID})"
    if vt == "CONTAINER":
        return ""
    return f"<{vt}>"


def _walk(items: Iterable[Dataset], depth: int, lines: list[str], skip_library: bool) -> None:
    for item in items:
        name = _code(item.ConceptNameCodeSequence[0]) if item.get("ConceptNameCodeSequence") else ""
        rel = item.get("RelationshipType", "")
        vt = item.get("ValueType", "")
        value = _value(item)
        lines.append(f"{'  ' * depth}{rel + ' ' if rel else ''}{vt} {name}{' = ' + value if value else ''}")
        children = item.get("ContentSequence")
        if children:
            if skip_library and "Image Library Group" in name:
                lines.append(f"{'  ' * (depth + 1)}... {len(children)} image library entries")
                continue
            _walk(children, depth + 1, lines, skip_library)


def render_sr_text(ds: Dataset, *, full_image_library: bool = False) -> str:
    """Readable indented rendering of an SR or KOS document (header summary + content tree)."""
    head = [
        f"{ds.get('SOPClassUID').name if ds.get('SOPClassUID') else 'SR'}  SOP {ds.get('SOPInstanceUID', '')}",
        f"Series {ds.get('SeriesNumber', '')} \"{ds.get('SeriesDescription', '')}\"  Study {ds.get('StudyInstanceUID', '')}",
        f"Completion {ds.get('CompletionFlag', '-')}  Verification {ds.get('VerificationFlag', '-')}  "
        f"Preliminary {ds.get('PreliminaryFlag', '-')}",
    ]
    for pre in ds.get("PredecessorDocumentsSequence", []):
        for s in pre.ReferencedSeriesSequence:
            for r in s.ReferencedSOPSequence:
                head.append(f"Predecessor SOP {r.ReferencedSOPInstanceUID}")
    lines: list[str] = []
    root = Dataset()
    for kw in ("ConceptNameCodeSequence", "ValueType", "ContentSequence"):
        if kw in ds:
            setattr(root, kw, ds[kw].value)
    _walk([root], 0, lines, not full_image_library)
    return "\n".join(head + [""] + lines) + "\n"


def render_image(ds: Dataset) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) view of a single-frame image."""
    arr = ds.pixel_array
    if ds.get("SamplesPerPixel", 1) == 3:
        return np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 3:
        arr = arr[0]
    a = arr.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c = float(np.atleast_1d(ds.WindowCenter)[0])
        w = float(np.atleast_1d(ds.WindowWidth)[0])
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = float(a.min()), float(a.max()) or 1.0
    out = np.clip((a - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return 255 - out if ds.get("PhotometricInterpretation") == "MONOCHROME1" else out


def result_kind(ds: Dataset) -> str:
    """A result object's file name without suffix, as `dicom-node analyse` writes it: "SR", "KO",
    "SC_summary" (the summary chart) or "SC_heatmap_<InstanceNumber>"; another object: its modality."""
    from dicom_node.results.sc import SUMMARY_CHART_COMMENT

    modality = str(ds.get("Modality", "")).upper()
    if modality in ("SR", "KO"):
        return modality
    if str(ds.get("ImageComments", "")).startswith(SUMMARY_CHART_COMMENT):
        return "SC_summary"
    if "PixelData" in ds:
        return f"SC_heatmap_{int(ds.get('InstanceNumber') or 0)}"
    return modality or "object"


def render_file(path: Path, out_dir: Path, stem: str | None = None) -> Path:
    """Render one DICOM file into `out_dir` as `<stem>.png` or `<stem>.txt` (default stem: its
    SOPInstanceUID); returns the written file."""
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or str(ds.get("SOPInstanceUID", Path(path).stem))
    if "ContentSequence" in ds:
        target = out_dir / f"{stem}.txt"
        target.write_text(render_sr_text(ds))
    elif "PixelData" in ds:
        target = out_dir / f"{stem}.png"
        Image.fromarray(render_image(ds)).save(target)
    else:
        raise ValueError(f"{path}: neither an image nor an SR/KOS document (SOP class {ds.get('SOPClassUID', '?')}); "
                         "pass result objects written by the node")
    return target


def render_files(paths: Iterable[Path], out_dir: Path) -> list[Path]:
    return [render_file(Path(p), Path(out_dir)) for p in paths]
