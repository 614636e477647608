"""Heatmap and summary Secondary Capture images (highdicom `SCImage`), RGB with burned-in captions.

Heatmap SC (one per key slice, `dicom_node.results.key_slices.select_key_slices`): the original source
slice at its own resolution (the SC keeps the slice's rows, columns and pixel spacing), CT in the PE
window (level 100, width 700) as grey, the window's heatmap mapped back onto that slice drawn with our
own inferno-like colour map and blended (alpha 0.5) only where the heatmap exceeds `hot_fraction`
(default 0.5) of its maximum: cold areas keep the untouched grey CT.

Its caption (`heatmap_caption`) names the source slice by the CT instance's own InstanceNumber and its
position along the slice normal in mm, the window (1-based, as in DerivationDescription), the label's
clinical name (`dicom_node.labels.DISPLAY_NAMES`), probability and threshold, "AI heatmap - not for
diagnostic use", "below threshold: not a finding" when the window's probability is under the threshold
(or the study was called no PE), and "low confidence, not validated" when the bundle marks the label
weak. The caption is burned in white on black at the bottom-left (`burn_caption`) in a band of at
most `CAPTION_MAX_FRACTION` (12 %) of the rows: the font shrinks and the parts take their short forms
until they fit, and on small images the least important parts (slice, then probability) are left out
of the pixels. ImageComments carries the full caption and the exact burned-in lines.

Summary SC: a chart of the ten label probabilities (clinical names) against their thresholds (bar +
tick), a verdict line ("PE suggested" / "no PE suggested"), a legend, and the attention over windows
(mean over the nine study heads, with the window PE probability), like Ma et al. 2022 Fig. 4, with the
research-use statement. Red is used only for a PE finding that was called; "no PE suggested", the
negative-exam and indeterminate calls and labels not called are neutral greys. Weak labels are marked
"*" with "(low confidence, not validated)" in the legend; a bundle without validation figures says so.

Both carry BurnedInAnnotation YES, the source image reference (SourceImageSequence and
ReferencedImageSequence), the same patient/study (`SCImage.from_ref_dataset`) and deterministic UIDs.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.labels import PE_FINDING_LABELS, WINDOW_LABEL, display_name
from dicom_node.model.bundle import LabelValidation
from dicom_node.results.codes import SOURCE_IMAGE_PURPOSE

if TYPE_CHECKING:
    import highdicom as hd

    from dicom_node.imaging.series import CtSeries
    from dicom_node.model.inference import Prediction
    from dicom_node.results.key_slices import KeySlice

__all__ = [
    "PE_WINDOW",
    "SUMMARY_CHART_COMMENT",
    "burn_caption",
    "BurnedCaption",
    "CAPTION_MAX_FRACTION",
    "CaptionPart",
    "draw_caption_lines",
    "HEATMAP_WARNING",
    "NOT_A_FINDING",
    "NOT_VALIDATED",
    "SUMMARY_COLOURS",
    "heatmap_caption",
    "colormap",
    "pe_window_grey",
    "render_overlay",
    "build_heatmap_sc",
    "render_summary_chart",
    "build_summary_sc",
]

PE_WINDOW = (100.0, 700.0)
HEATMAP_WARNING = "AI heatmap - not for diagnostic use"
#: how the summary chart SC's ImageComments begins (readers tell it from the heatmap SCs by it)
SUMMARY_CHART_COMMENT = "AI summary chart"
NOT_A_FINDING = "below threshold: not a finding"
NOT_VALIDATED = "low confidence, not validated"
#: the caption band covers at most this fraction of the image rows
CAPTION_MAX_FRACTION = 0.12
_MIN_FONT, _MAX_FONT = 6, 14

#: summary chart colours: red only for a called PE finding; everything else is neutral
SUMMARY_COLOURS: dict[str, tuple[int, int, int]] = {
    "pe_finding": (200, 40, 40),       # a PE finding label called present
    "called_no_pe": (90, 90, 90),      # negative exam / indeterminate called present ("no PE suggested")
    "not_called": (185, 185, 185),     # probability below the threshold
    "attention": (110, 140, 180),
    "text": (0, 0, 0),
}

# control points of an inferno-like map (black -> purple -> red -> orange -> pale yellow), written by us
_CMAP_POINTS = np.array([
    [0.00, 0, 0, 4], [0.15, 40, 11, 84], [0.35, 120, 28, 109], [0.55, 188, 55, 84],
    [0.75, 237, 105, 37], [0.90, 251, 180, 26], [1.00, 252, 255, 164],
], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """(…) values in [0, 1] -> (…, 3) uint8 RGB on the inferno-like map."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = [np.interp(v, _CMAP_POINTS[:, 0], _CMAP_POINTS[:, i]) for i in (1, 2, 3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def pe_window_grey(hu: np.ndarray, window: tuple[float, float] = PE_WINDOW) -> np.ndarray:
    """HU slice -> uint8 grey in the given (level, width) window."""
    level, width = window
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, np.float64) - lo) / width * 255.0, 0, 255).round().astype(np.uint8)


def render_overlay(hu_slice: np.ndarray, heatmap: np.ndarray, *, hot_fraction: float = 0.5,
                   alpha: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, bool hot mask): grey PE-window CT with the heatmap blended where it is hot."""
    grey = pe_window_grey(hu_slice)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    hm = np.asarray(heatmap, np.float64)
    if hm.shape != grey.shape:
        raise ValueError(f"heatmap shape {hm.shape} differs from the slice {grey.shape}; map it with heatmap_to_slices")
    peak = float(hm.max()) if hm.size else 0.0
    if peak <= 0:
        return rgb, np.zeros(grey.shape, bool)
    norm = hm / peak
    hot = norm > hot_fraction
    colour = colormap((norm - hot_fraction) / (1.0 - hot_fraction) * 0.85 + 0.15)
    blended = (1 - alpha) * rgb.astype(np.float64) + alpha * colour.astype(np.float64)
    rgb[hot] = blended[hot].round().astype(np.uint8)
    return rgb, hot


def _font(size: int) -> Any:  # a Pillow FreeTypeFont or, on old Pillow, the bitmap ImageFont
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


@dataclass(frozen=True)
class CaptionPart:
    """One part of a caption in its forms, longest first; `required` parts are never left out of the pixels."""

    forms: tuple[str, ...]
    required: bool = False

    @property
    def full(self) -> str:
        return self.forms[0]


@dataclass(frozen=True)
class BurnedCaption:
    """What `burn_caption` drew: the lines (top to bottom), the font size and the band (first row, rows)."""

    lines: tuple[str, ...]
    font_size: int
    band_top: int
    band_rows: int
    left_out: tuple[str, ...] = ()

    def comment(self) -> str:
        """The burned-in text as ImageComments records it."""
        text = f"Burned-in caption ({self.font_size} px font, {len(self.lines)} lines): " + " / ".join(self.lines)
        return text + (f" (left out of the pixels for space: {'; '.join(self.left_out)})" if self.left_out else "")


def _line_metrics(font: Any) -> tuple[int, int]:
    """(offset from the drawing origin to the ink top, ink height) of a line of this font."""
    left, top, right, bottom = font.getbbox("Agpy()|#_,0123456789")
    return int(top), int(bottom - top)


def _pack(texts: Sequence[str], font: Any, width: int) -> list[str] | None:
    """Greedy: join texts with " | " into lines no wider than `width`; None if one text alone is wider."""
    lines: list[str] = []
    for t in texts:
        if font.getlength(t) > width:
            return None
        if lines and font.getlength(lines[-1] + " | " + t) <= width:
            lines[-1] += " | " + t
        else:
            lines.append(t)
    return lines


def _fit(parts: Sequence[CaptionPart], rows: int, cols: int,
         max_fraction: float) -> tuple[list[str], int, list[str]]:
    """(lines, font size, full forms left out) of the largest caption that fits the band."""
    budget = int(math.floor(rows * max_fraction))
    width = cols - 4
    top_size = int(np.clip(rows // 36, _MIN_FONT, _MAX_FONT))
    kept = list(parts)
    while True:
        for size in range(top_size, _MIN_FONT - 1, -1):
            font = _font(size)
            _, ink = _line_metrics(font)
            n_lines = (budget - 1) // (ink + 1)
            if n_lines < 1:
                continue
            depth = max(len(p.forms) for p in kept)
            for level in range(depth):
                texts = [p.forms[min(level, len(p.forms) - 1)] for p in kept]
                lines = _pack(texts, font, width)
                if lines is not None and len(lines) <= n_lines:
                    left = [p.full for p in parts if p not in kept]
                    return lines, size, left
        optional = [p for p in kept if not p.required]
        if not optional:
            break
        kept.remove(optional[-1])  # the least important optional part goes first
    # not even the required parts fit (a small image): their shortest forms at the smallest font, in order
    # of importance, each on the last line or a new one while lines remain; a part that fits nowhere is left out
    font = _font(_MIN_FONT)
    _, ink = _line_metrics(font)
    n_lines = max(0, (budget - 1) // (ink + 1))
    lines = []
    placed = []
    for part in kept:
        t = part.forms[-1]
        if lines and font.getlength(lines[-1] + " | " + t) <= width:
            lines[-1] += " | " + t
        elif len(lines) < n_lines and font.getlength(t) <= width:
            lines.append(t)
        else:
            continue
        placed.append(part)
    return lines, _MIN_FONT, [p.full for p in parts if p not in placed]


def burn_caption(rgb: np.ndarray, parts: Sequence[CaptionPart | str], *,
                 max_fraction: float = CAPTION_MAX_FRACTION) -> tuple[np.ndarray, BurnedCaption]:
    """Burn `parts` (most important first; plain strings are required parts) as white text on black at
    the bottom-left of a copy of `rgb`, within a band of at most `max_fraction` of its rows."""
    items = [p if isinstance(p, CaptionPart) else CaptionPart((p,), required=True) for p in parts]
    lines, size, left_out = _fit(items, int(rgb.shape[0]), int(rgb.shape[1]), max_fraction)
    pixels, band_top, band_rows = draw_caption_lines(rgb, lines, size)
    return pixels, BurnedCaption(tuple(lines), size, band_top, band_rows, tuple(left_out))


def draw_caption_lines(rgb: np.ndarray, lines: Sequence[str], font_size: int) -> tuple[np.ndarray, int, int]:
    """(copy of `rgb` with `lines` drawn white on black at the bottom-left, band's first row, band rows).

    The band is `len(lines) * (ink height + 1) + 1` rows; each line's black box is as wide as its text.
    """
    from PIL import Image, ImageDraw

    rows, cols = int(rgb.shape[0]), int(rgb.shape[1])
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    draw = ImageDraw.Draw(img)
    font = _font(font_size)
    offset, ink = _line_metrics(font)
    pitch = ink + 1
    band_rows = len(lines) * pitch + 1 if lines else 0
    band_top = rows - band_rows
    for i, line in enumerate(lines):
        y = band_top + i * pitch  # the line's box: rows y .. y + pitch - 1 (1 px of black above the ink)
        length = int(math.ceil(font.getlength(line)))
        draw.rectangle([0, y, min(cols - 1, length + 3), y + pitch if i == len(lines) - 1 else y + pitch - 1],
                       fill=(0, 0, 0))
        for _ in range(2 if font_size < 10 else 1):  # small anti-aliased text twice: brighter thin strokes
            draw.text((2, y + 1 - offset), line, fill=(255, 255, 255), font=font)
    return np.asarray(img, dtype=np.uint8), band_top, band_rows


def _num(v: float) -> str:
    return f"{v:.2f}"


def heatmap_caption(*, window_number: int, probability: float, threshold: float | None,
                    instance_number: int | None, position_mm: float, frame_number: int = 0,
                    study_positive: bool = True, weak: bool = False, label: str = WINDOW_LABEL) -> list[CaptionPart]:
    """The parts of a heatmap SC's caption, most important first (see module docstring).

    `window_number` is 1-based; `instance_number` is the source CT instance's own InstanceNumber (None:
    the instance has none, shown as "?"); `position_mm` the slice's position along the slice normal.
    Required: the warning, "not a finding" (when it is not), the slice and the weak-label mark; the
    probability and threshold are the first to leave the pixels of a small image (never ImageComments).
    """
    below = threshold is not None and probability < threshold
    name = display_name(label)
    what = f"PE in window {window_number}" if label == WINDOW_LABEL else f"{name}, window {window_number}"
    short = "PE" if label == WINDOW_LABEL else name
    p = _num(probability)
    prob: tuple[str, ...]
    if threshold is None:
        prob = (f"{what}: p {p}", f"{short} p {p}")
    else:
        op = "<" if below else ">="
        prob = (f"{what}: p {p} {op} threshold {_num(threshold)}", f"{short} w{window_number} p {p} {op} {_num(threshold)}",
                f"{short} p {p} {op} {_num(threshold)}")
    image = "?" if instance_number is None else str(instance_number)
    frame = f" frame {frame_number}" if frame_number else ""
    parts = [CaptionPart((HEATMAP_WARNING,), required=True)]
    if below:
        parts.append(CaptionPart((NOT_A_FINDING,), required=True))
    elif not study_positive:
        parts.append(CaptionPart(("not a finding: study called no PE", "not a finding (study: no PE)"), required=True))
    parts.append(CaptionPart((f"CT image {image}{frame} at {position_mm:.1f} mm",
                              f"image {image}{frame}, {position_mm:.1f} mm", f"#{image}{frame} {position_mm:.1f}mm"),
                             required=True))
    if weak:
        parts.append(CaptionPart((f"{name}: {NOT_VALIDATED}", NOT_VALIDATED, "not validated"), required=True))
    parts.append(CaptionPart(prob))
    return parts


def _patient_orientation(cosines: Sequence[float]) -> tuple[str, str]:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    out = []
    for vec in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vec)))
        out.append(letters[axis][0] if vec[axis] > 0 else letters[axis][1])
    return out[0], out[1]


def _add_source_reference(sc: Dataset, source: Dataset, purpose: str) -> None:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.ReferencedImageSequence = [ref]
    src = Dataset()
    src.ReferencedSOPClassUID = source.SOPClassUID
    src.ReferencedSOPInstanceUID = source.SOPInstanceUID
    code = Dataset()
    code.CodeValue = SOURCE_IMAGE_PURPOSE.value
    code.CodingSchemeDesignator = SOURCE_IMAGE_PURPOSE.scheme_designator
    code.CodeMeaning = SOURCE_IMAGE_PURPOSE.meaning
    src.PurposeOfReferenceCodeSequence = [code]
    sc.SourceImageSequence = [src]
    sc.DerivationDescription = purpose[:1024]


def _sc_from(series_ref: Dataset, pixels: np.ndarray, *, series_instance_uid: str, sop_instance_uid: str,
             series_number: int, instance_number: int, manufacturer: str,
             pixel_spacing: tuple[float, ...] | None, series_description: str,
             orientation: tuple[str, str]) -> hd.sc.SCImage:
    import highdicom as hd

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=series_ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]  # highdicom annotates spacing in mm as tuple[int, int]
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:
        sc.Laterality = None  # type: ignore[assignment]  # pydicom stubs lack None (empty value); Type 2C: a chest CT is not a paired structure; present and empty
    sc.SeriesDescription = series_description[:64]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    return sc


def build_heatmap_sc(series: CtSeries, key_slice: KeySlice, *, label: str = WINDOW_LABEL, probability: float, series_instance_uid: str,
                     sop_instance_uid: str, series_number: int, instance_number: int, manufacturer: str,
                     hot_fraction: float = 0.5, series_description: str, threshold: float | None = None,
                     study_positive: bool = True, validation: LabelValidation | None = None) -> Dataset:
    """One heatmap SC for `key_slice` (a `KeySlice`) of `series` (a `CtSeries`).

    `threshold`: the label's decision threshold (captions say "below threshold: not a finding" under it);
    `study_positive`: whether the study was called PE present; `validation`: the bundle's weak labels.
    """
    from dicom_node.results.references import source_image_dataset

    z = key_slice.z
    window_number = key_slice.window_index + 1  # 1-based in the caption and DerivationDescription alike
    src_number = series.instance_numbers[z] if z < len(series.instance_numbers) else None
    frame = series.frame_numbers[z] if z < len(series.frame_numbers) else 0
    position = float(series.positions_mm[z])
    weak = validation is not None and validation.is_weak(label)
    parts = heatmap_caption(window_number=window_number, probability=probability, threshold=threshold,
                            instance_number=src_number, position_mm=position, frame_number=frame,
                            study_positive=study_positive, weak=weak, label=label)
    rgb, _ = render_overlay(series.hu[z], key_slice.heatmap, hot_fraction=hot_fraction)
    pixels, caption = burn_caption(rgb, parts)
    source = source_image_dataset(series, z)
    sc = _sc_from(series.ref_dataset, np.ascontiguousarray(pixels), series_instance_uid=series_instance_uid,
                  sop_instance_uid=sop_instance_uid, series_number=series_number, instance_number=instance_number,
                  manufacturer=manufacturer, pixel_spacing=tuple(float(v) for v in series.pixel_spacing_mm),
                  series_description=series_description,
                  orientation=_patient_orientation(series.image_orientation))
    image = "?" if src_number is None else str(src_number)
    frame_txt = f" frame {frame}" if frame else ""
    _add_source_reference(sc, source, f"PE window {PE_WINDOW[0]:g}/{PE_WINDOW[1]:g} of CT image {image}{frame_txt} "
                                      f"at {position:.1f} mm with the AI heatmap of window {window_number} "
                                      f"(1-based) overlaid where > {hot_fraction:g} of its max")
    full = "; ".join(p.full for p in parts[1:])
    sc.ImageComments = (f"{HEATMAP_WARNING}. {full}. {caption.comment()}. {RESEARCH_USE_STATEMENT}")[:10240]
    return sc


def _legend(d: Any, x: int, y: int, colour: tuple[int, int, int], text: str, font: Any) -> int:
    d.rectangle([x, y + 3, x + 14, y + 11], fill=colour)
    d.text((x + 19, y + 1), text, fill=SUMMARY_COLOURS["text"], font=font)
    return x + 19 + int(font.getlength(text)) + 14


def _verdict(prediction: Prediction) -> tuple[str, bool]:
    """(verdict text, whether it is a PE finding)."""
    if bool(prediction.labels.get(WINDOW_LABEL)):
        return "AI result: PE suggested", True
    if bool(prediction.labels.get("indeterminate")):
        return "AI result: no PE suggested (exam indeterminate)", False
    return "AI result: no PE suggested", False


def render_summary_chart(prediction: Prediction, width: int = 640, height: int = 512, *,
                         validation: LabelValidation | None = None) -> np.ndarray:
    """(height, width, 3) uint8 chart: verdict, label probabilities vs thresholds with a legend, attention."""
    from PIL import Image, ImageDraw

    validation = validation or LabelValidation()
    colours = SUMMARY_COLOURS
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    wp = np.asarray(prediction.window_probs, np.float64).reshape(-1)
    probs = prediction.label_probabilities()
    d.text((8, 6), f"AI PE detection - {prediction.model_name} {prediction.model_version}", fill=colours["text"], font=font)
    verdict, positive = _verdict(prediction)
    d.text((8, 24), verdict, fill=colours["pe_finding"] if positive else colours["called_no_pe"], font=font)
    # --- probabilities vs thresholds
    top, row_h, x0, bar_w = 46, 22, 190, width - 190 - 70
    used: set[str] = set()
    shown = prediction.predicted_labels  # the bundle's labels only (the window label alone for shi2020)
    for i, label in enumerate(shown):
        y = top + i * row_h
        p, t = probs[label], float(prediction.thresholds[label])
        on = bool(prediction.labels[label])
        name = display_name(label) + (" *" if validation.is_weak(label) else "")
        d.text((8, y + 4), name, fill=colours["text"], font=small)
        d.rectangle([x0, y + 3, x0 + bar_w, y + row_h - 5], outline=(160, 160, 160))
        kind = ("pe_finding" if label in PE_FINDING_LABELS else "called_no_pe") if on else "not_called"
        used.add(kind)
        d.rectangle([x0, y + 3, x0 + int(round(p * bar_w)), y + row_h - 5], fill=colours[kind])
        tx = x0 + int(round(t * bar_w))
        d.line([tx, y, tx, y + row_h - 2], fill=colours["text"], width=2)
        d.text((x0 + bar_w + 6, y + 4), f"{p:.2f}  {'yes' if on else 'no'}", fill=colours["text"], font=small)
    # --- legend: only the colours the chart uses (a study called no PE shows no red at all)
    ly = top + len(shown) * row_h + 2
    x = 8
    for kind, text in (("pe_finding", "PE finding called"), ("called_no_pe", "called, no PE (negative / indeterminate)"),
                       ("not_called", "not called (below threshold)")):
        if kind in used:
            x = _legend(d, x, ly, colours[kind], text, small)
    d.line([8 + 7, ly + 15, 8 + 7, ly + 27], fill=colours["text"], width=2)
    d.text((8 + 19, ly + 15), "threshold; p and yes/no per label at the right", fill=colours["text"], font=small)
    if not validation.known:
        note = "label validation unknown: the model bundle records no validation AUROC"
    elif validation.weak:
        note = f"* ({NOT_VALIDATED}): validation AUROC below {validation.floor:.2f} or undefined"
    else:
        note = f"every label validated (validation AUROC >= {validation.floor:.2f})"
    d.text((8, ly + 30), note, fill=colours["text"], font=small)
    # --- attention over windows (mean of the nine heads) and window probability
    att = np.asarray(prediction.attention, np.float64).mean(axis=0)
    gy0 = ly + 66
    gy1 = height - 48
    gx0, gx1 = 40, width - 20
    d.text((8, gy0 - 18), "attention over windows (bars) and window PE probability (line; grey: its threshold)",
           fill=colours["text"], font=small)
    d.rectangle([gx0, gy0, gx1, gy1], outline=(160, 160, 160))
    n = max(len(att), 1)
    step = (gx1 - gx0) / n
    amax = float(att.max()) if att.size and att.max() > 0 else 1.0
    t_win = float(prediction.thresholds[WINDOW_LABEL])
    ty = int(gy1 - (gy1 - gy0) * t_win)
    pts = []
    for w in range(len(att)):
        bx0 = gx0 + w * step + 1
        bh = (gy1 - gy0) * att[w] / amax
        d.rectangle([int(bx0), int(gy1 - bh), int(bx0 + step - 2), gy1], fill=colours["attention"])
        pts.append((int(bx0 + step / 2), int(gy1 - (gy1 - gy0) * wp[w])))
    for xx in range(gx0, gx1, 8):
        d.line([xx, ty, min(xx + 4, gx1), ty], fill=(140, 140, 140), width=1)
    if len(pts) > 1:
        d.line(pts, fill=colours["text"], width=2)
    d.text((gx0, gy1 + 2), "window 1", fill=colours["text"], font=small)
    d.text((gx1 - 60, gy1 + 2), f"window {n}", fill=colours["text"], font=small)
    for i, line in enumerate(textwrap.wrap(RESEARCH_USE_STATEMENT, 95)[:2]):
        d.text((8, height - 28 + 13 * i), line, fill=colours["text"], font=small)
    return np.asarray(img, dtype=np.uint8)


def build_summary_sc(series: CtSeries, prediction: Prediction, *, series_instance_uid: str, sop_instance_uid: str, series_number: int,
                     instance_number: int, manufacturer: str, reference_z: int = 0,
                     series_description: str, validation: LabelValidation | None = None) -> Dataset:
    """The summary chart as an SC in the heatmap series; references slice `reference_z` as its source."""
    from dicom_node.results.references import source_image_dataset

    validation = validation or LabelValidation()
    pixels = render_summary_chart(prediction, validation=validation)
    sc = _sc_from(series.ref_dataset, pixels, series_instance_uid=series_instance_uid,
                  sop_instance_uid=sop_instance_uid, series_number=series_number, instance_number=instance_number,
                  manufacturer=manufacturer, pixel_spacing=None, series_description=series_description,
                  orientation=_patient_orientation(series.image_orientation))
    _add_source_reference(sc, source_image_dataset(series, reference_z),
                          "Chart of AI label probabilities vs thresholds and attention over windows")
    verdict, _ = _verdict(prediction)
    probs = prediction.label_probabilities()
    rows = "; ".join(f"{display_name(k)} p {probs[k]:.2f} threshold {float(prediction.thresholds[k]):.2f} "
                     f"{'called' if prediction.labels[k] else 'not called'}"
                     f"{' (' + NOT_VALIDATED + ')' if validation.is_weak(k) else ''}"
                     for k in prediction.predicted_labels)
    weak = ("label validation unknown (no validation AUROC in the bundle)" if not validation.known else
            f"{NOT_VALIDATED} (validation AUROC < {validation.floor:.2f}): "
            f"{', '.join(display_name(k) for k in validation.weak or ()) or 'none'}")
    sc.ImageComments = f"{SUMMARY_CHART_COMMENT}. {verdict}. {rows}. {weak}. {RESEARCH_USE_STATEMENT}"[:10240]
    return sc
