"""Heatmap and summary Secondary Capture images (highdicom `SCImage`), RGB with burned-in captions.

Heatmap SC (one per key slice, `dicom_node.results.key_slices.select_key_slices`): the original source
slice at its own resolution, CT in the PE window (level 100, width 700) as grey, the window's
heatmap mapped back onto that slice drawn with our own inferno-like colour map and blended
(alpha 0.5) only where the heatmap exceeds `hot_fraction` (default 0.5) of its maximum: cold areas
keep the untouched grey CT. A caption burned into the bottom-left corner (white text, black
outline, Pillow's default font) names the label and probability and says "AI heatmap - not for
diagnostic use". The SC has the source slice's rows, columns and pixel spacing.

Summary SC: a chart of the ten label probabilities against their thresholds (bar + tick) and the
attention over windows (mean over the nine study heads, with the window PE probability), like
Ma et al. 2022 Fig. 4, with the research-use statement.

Both carry BurnedInAnnotation YES, the source image reference (SourceImageSequence and
ReferencedImageSequence), the same patient/study (`SCImage.from_ref_dataset`) and deterministic UIDs.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.labels import ALL_LABELS, WINDOW_LABEL
from dicom_node.results.codes import SOURCE_IMAGE_PURPOSE

if TYPE_CHECKING:
    import highdicom as hd

    from dicom_node.imaging.series import CtSeries
    from dicom_node.model.inference import Prediction
    from dicom_node.results.key_slices import KeySlice

__all__ = [
    "PE_WINDOW",
    "burn_caption",
    "HEATMAP_WARNING",
    "colormap",
    "pe_window_grey",
    "render_overlay",
    "build_heatmap_sc",
    "render_summary_chart",
    "build_summary_sc",
]

PE_WINDOW = (100.0, 700.0)
HEATMAP_WARNING = "AI heatmap - not for diagnostic use"

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


def burn_caption(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Draw `lines` in white with a black outline at the bottom-left of a copy of `rgb`."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    draw = ImageDraw.Draw(img)
    size = int(np.clip(rgb.shape[1] // 40, 8, 16))
    font = _font(size)
    width_chars = max(12, int((rgb.shape[1] - 6) / (0.6 * size)))
    lines = [part for line in lines for part in textwrap.wrap(line, width_chars)]
    y = rgb.shape[0] - (size + 3) * len(lines) - 2
    for line in lines:
        draw.text((3, y), line, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        y += size + 3
    return np.asarray(img, dtype=np.uint8)


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
                     hot_fraction: float = 0.5, series_description: str) -> Dataset:
    """One heatmap SC for `key_slice` (a `KeySlice`) of `series` (a `CtSeries`)."""
    from dicom_node.results.references import source_image_dataset

    z = key_slice.z
    rgb, _ = render_overlay(series.hu[z], key_slice.heatmap, hot_fraction=hot_fraction)
    lines = [
        f"{label}: p={probability:.2f}  window {key_slice.window_index + 1}, slice {z + 1}",
        HEATMAP_WARNING,
    ]
    pixels = burn_caption(rgb, lines)
    source = source_image_dataset(series, z)
    sc = _sc_from(series.ref_dataset, np.ascontiguousarray(pixels), series_instance_uid=series_instance_uid,
                  sop_instance_uid=sop_instance_uid, series_number=series_number, instance_number=instance_number,
                  manufacturer=manufacturer, pixel_spacing=tuple(float(v) for v in series.pixel_spacing_mm),
                  series_description=series_description,
                  orientation=_patient_orientation(series.image_orientation))
    _add_source_reference(sc, source, f"PE window {PE_WINDOW[0]:g}/{PE_WINDOW[1]:g} with AI heatmap overlay "
                                      f"(window {key_slice.window_index}, hot > {hot_fraction:g} of max)")
    sc.ImageComments = f"{label} p={probability:.3f}; {HEATMAP_WARNING}. {RESEARCH_USE_STATEMENT}"[:10240]
    return sc


def render_summary_chart(prediction: Prediction, width: int = 640, height: int = 512) -> np.ndarray:
    """(height, width, 3) uint8 chart: label probabilities vs thresholds, attention over windows."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    wp = np.asarray(prediction.window_probs, np.float64).reshape(-1)
    probs = prediction.label_probabilities()
    d.text((8, 6), f"AI PE detection - {prediction.model_name} {prediction.model_version}", fill=(0, 0, 0), font=font)
    # --- probabilities vs thresholds
    top, row_h, x0, bar_w = 30, 24, 170, width - 170 - 70
    for i, label in enumerate(ALL_LABELS):
        y = top + i * row_h
        p, t = probs[label], float(prediction.thresholds[label])
        on = bool(prediction.labels[label])
        d.text((8, y + 4), label, fill=(0, 0, 0), font=small)
        d.rectangle([x0, y + 3, x0 + bar_w, y + row_h - 5], outline=(160, 160, 160))
        colour = (200, 40, 40) if on else (70, 110, 190)
        d.rectangle([x0, y + 3, x0 + int(round(p * bar_w)), y + row_h - 5], fill=colour)
        tx = x0 + int(round(t * bar_w))
        d.line([tx, y, tx, y + row_h - 2], fill=(0, 0, 0), width=2)
        d.text((x0 + bar_w + 6, y + 4), f"{p:.2f} {'+' if on else '-'}", fill=(0, 0, 0), font=small)
    # --- attention over windows (mean of the nine heads) and window probability
    att = np.asarray(prediction.attention, np.float64).mean(axis=0)
    gy0 = top + len(ALL_LABELS) * row_h + 28
    gy1 = height - 48
    gx0, gx1 = 40, width - 20
    d.text((8, gy0 - 20), "attention over windows (bars) and window PE probability (line)", fill=(0, 0, 0), font=small)
    d.rectangle([gx0, gy0, gx1, gy1], outline=(160, 160, 160))
    n = max(len(att), 1)
    step = (gx1 - gx0) / n
    amax = float(att.max()) if att.size and att.max() > 0 else 1.0
    pts = []
    for w in range(len(att)):
        bx0 = gx0 + w * step + 1
        bh = (gy1 - gy0) * att[w] / amax
        d.rectangle([int(bx0), int(gy1 - bh), int(bx0 + step - 2), gy1], fill=(240, 160, 40))
        pts.append((int(bx0 + step / 2), int(gy1 - (gy1 - gy0) * wp[w])))
    if len(pts) > 1:
        d.line(pts, fill=(200, 40, 40), width=2)
    d.text((gx0, gy1 + 2), "window 1", fill=(0, 0, 0), font=small)
    d.text((gx1 - 60, gy1 + 2), f"window {n}", fill=(0, 0, 0), font=small)
    for i, line in enumerate(textwrap.wrap(RESEARCH_USE_STATEMENT, 95)[:2]):
        d.text((8, height - 28 + 13 * i), line, fill=(150, 0, 0), font=small)
    return np.asarray(img, dtype=np.uint8)


def build_summary_sc(series: CtSeries, prediction: Prediction, *, series_instance_uid: str, sop_instance_uid: str, series_number: int,
                     instance_number: int, manufacturer: str, reference_z: int = 0,
                     series_description: str) -> Dataset:
    """The summary chart as an SC in the heatmap series; references slice `reference_z` as its source."""
    from dicom_node.results.references import source_image_dataset

    pixels = render_summary_chart(prediction)
    sc = _sc_from(series.ref_dataset, pixels, series_instance_uid=series_instance_uid,
                  sop_instance_uid=sop_instance_uid, series_number=series_number, instance_number=instance_number,
                  manufacturer=manufacturer, pixel_spacing=None, series_description=series_description,
                  orientation=_patient_orientation(series.image_orientation))
    _add_source_reference(sc, source_image_dataset(series, reference_z),
                          "Chart of AI label probabilities vs thresholds and attention over windows")
    sc.ImageComments = f"AI summary chart. {RESEARCH_USE_STATEMENT}"
    return sc
