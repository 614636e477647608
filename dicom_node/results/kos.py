"""Key slices of a prediction and the Key Object Selection (KOS) document that lists them.

The *key slices* are what the radiologist should look at first. They are chosen once and shared
by the SR (image references), the heatmap Secondary Captures and the KOS:

1. every window w gets the score ``window_probs[w] * mean_h(attention[h, w])`` (PE probability
   weighted by how much the nine study heads attend to the window);
2. the top-k windows by that score are kept (default k = 3, ties broken by window index);
3. within each kept window, the model-space heatmap is mapped back to the original slices the
   window covers (`dicom_node.imaging.preprocess.heatmap_to_slices`) and the slice with the strongest
   heatmap wins.

The KOS (TID 2010) uses the title "Of Interest" (DCM 113000) by default, or "For Teaching"
(DCM 113004), and a description that says it is an AI selection for research use.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node import RESEARCH_USE_STATEMENT

__all__ = [
    "KeySlice",
    "KeyObjectError",
    "KOS_TITLES",
    "window_scores",
    "map_heatmap_to_slices",
    "select_key_slices",
    "source_image_datasets",
    "source_image_dataset",
    "build_kos",
    "hottest_point",
    "heatmap_hits_embolus",
]

#: Document titles (CID 7010) accepted by `build_kos`.
KOS_TITLES = {"of_interest": codes.DCM.OfInterest, "for_teaching": codes.DCM.ForTeaching}


class KeyObjectError(ValueError):
    """The prediction, windows and series do not fit together; the message says which and why."""


@dataclass(frozen=True)
class KeySlice:
    """One key slice: window `window_index`, original slice `z` of the series (SOP `sop_instance_uid`).

    `heatmap` is the window's heatmap mapped onto that slice, (Y, X) float32, non-negative.
    `score` is the window's attention-weighted PE probability; `peak` the heatmap maximum on the slice.
    """

    rank: int
    window_index: int
    z: int
    sop_instance_uid: str
    window_probability: float
    score: float
    peak: float
    heatmap: np.ndarray


def window_scores(prediction) -> np.ndarray:
    """(N,) PE probability of each window times the mean attention the study heads give it."""
    probs = np.asarray(prediction.window_probs, dtype=np.float64).reshape(-1)
    att = np.asarray(prediction.attention, dtype=np.float64)
    if att.ndim != 2 or att.shape[1] != probs.size:
        raise KeyObjectError(
            f"Series {prediction.series_instance_uid}: attention has shape {att.shape}, expected (9, {probs.size}) "
            "to match window_probs; pass the stage-2 attention weights unchanged"
        )
    return probs * att.mean(axis=0)


def map_heatmap_to_slices(series, windows, window_index: int, heatmap: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(z, (Y, X) heatmap)] for the original slices covered by window `window_index` (via preprocess)."""
    from dicom_node.imaging.preprocess import heatmap_to_slices

    mapped = heatmap_to_slices(windows, window_index, heatmap)
    for z, m in mapped:
        if not 0 <= z < len(series.sop_instance_uids) or m.shape != tuple(series.hu.shape[1:]):
            raise KeyObjectError(
                f"Series {series.series_instance_uid}: window {window_index} maps to slice {z} of shape {m.shape}, "
                f"but the series has {len(series.sop_instance_uids)} slices of {tuple(series.hu.shape[1:])}; "
                "build the Windows from this CtSeries"
            )
    return [(int(z), np.asarray(m, dtype=np.float32)) for z, m in mapped]


def select_key_slices(series, windows, prediction, k: int = 3) -> tuple[KeySlice, ...]:
    """The top-k windows by attention-weighted PE probability, each with its hottest original slice."""
    n = len(windows.slice_uids)
    if np.asarray(prediction.window_probs).size != n or len(prediction.heatmaps) != n:
        raise KeyObjectError(
            f"Series {series.series_instance_uid}: prediction has {np.asarray(prediction.window_probs).size} window "
            f"probabilities and {len(prediction.heatmaps)} heatmaps but the windows are {n}; "
            "run inference on these windows"
        )
    if k < 1:
        raise KeyObjectError(f"key slice count k={k}; expected k >= 1")
    scores = window_scores(prediction)
    order = sorted(range(n), key=lambda i: (-scores[i], i))[: min(k, n)]
    out = []
    for rank, wi in enumerate(order):
        mapped = map_heatmap_to_slices(series, windows, wi, prediction.heatmaps[wi])
        if not mapped:
            raise KeyObjectError(f"Series {series.series_instance_uid}: window {wi} covers no original slice")
        # strongest heatmap: highest peak, ties -> larger total, then the earlier slice
        z, hm = max(mapped, key=lambda zm: (float(zm[1].max()), float(zm[1].sum()), -zm[0]))
        out.append(KeySlice(
            rank=rank, window_index=wi, z=z, sop_instance_uid=series.sop_instance_uids[z],
            window_probability=float(np.asarray(prediction.window_probs)[wi]), score=float(scores[wi]),
            peak=float(hm.max()), heatmap=hm,
        ))
    return tuple(out)


def source_image_datasets(series) -> list[Dataset]:
    """Header-only datasets of every slice of the series (for evidence lists and image libraries).

    Built from `series.ref_dataset` (slice 0) with each slice's SOP Instance UID, instance number
    and ImagePositionPatient (slice 0 position moved along the slice normal by `positions_mm`).
    The header is copied once; the per-slice datasets share its unchanged elements (read-only).
    """
    base = _copy_header(series.ref_dataset)
    return [source_image_dataset(series, z, base=base) for z in range(len(series.sop_instance_uids))]


def source_image_dataset(series, z: int, *, base: Dataset | None = None) -> Dataset:
    """Header-only dataset of slice `z` (see `source_image_datasets`)."""
    base = _copy_header(series.ref_dataset) if base is None else base
    row, col = np.array(series.image_orientation[:3], float), np.array(series.image_orientation[3:], float)
    normal = np.cross(row, col)
    first = np.array(series.image_position_first, float)
    pos = np.asarray(series.positions_mm, float)
    ds = Dataset(dict(base._dict))  # own mapping over the shared elements; the ones set below are new objects
    ds.add_new(0x00080018, "UI", series.sop_instance_uids[z])  # SOPInstanceUID
    ds.add_new(0x00200013, "IS", z + 1)  # InstanceNumber
    ds.add_new(0x00200032, "DS", [float(v) for v in first + normal * (pos[z] - pos[0])])  # ImagePositionPatient
    ds.add_new(0x0020000E, "UI", series.series_instance_uid)  # SeriesInstanceUID
    ds.add_new(0x0020000D, "UI", series.study_instance_uid)  # StudyInstanceUID
    if "FrameOfReferenceUID" not in ds and series.frame_of_reference_uid:
        ds.add_new(0x00200052, "UI", series.frame_of_reference_uid)
    return ds


def _copy_header(ref: Dataset) -> Dataset:
    ds = Dataset()
    for elem in ref:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            ds.add(copy.deepcopy(elem))
    return ds


def build_kos(
    series,
    key_slices: Sequence[KeySlice],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    manufacturer: str,
    title: str = "of_interest",
    description: str | None = None,
    observer_device_context=None,
    series_description: str = "AI key images (research)",
):
    """A Key Object Selection Document listing `key_slices` (same patient and study, own series)."""
    import highdicom as hd

    if title not in KOS_TITLES:
        raise KeyObjectError(f"KOS title {title!r}; expected one of {sorted(KOS_TITLES)}")
    if not key_slices:
        raise KeyObjectError(f"Series {series.series_instance_uid}: no key slices to list in a KOS")
    datasets = {ds.SOPInstanceUID: ds for ds in source_image_datasets(series)}
    refs = [datasets[ks.sop_instance_uid] for ks in key_slices]
    if description is None:
        description = (
            "AI-selected key images: slices with the strongest heatmap in the windows with the highest "
            "attention-weighted PE probability. " + RESEARCH_USE_STATEMENT
        )
    content = hd.ko.KeyObjectSelection(
        document_title=KOS_TITLES[title],
        referenced_objects=refs,
        observer_device_context=observer_device_context,
        description=description[:1024],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=refs,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
    )
    kos.SeriesDescription = series_description
    return kos


def hottest_point(key_slices: Sequence[KeySlice]) -> tuple[int, int, int]:
    """(z, y, x) of the hottest heatmap pixel over all key slices (original voxel indices)."""
    if not key_slices:
        raise KeyObjectError("no key slices: cannot locate the hottest heatmap point")
    best = max(key_slices, key=lambda ks: (ks.peak, -ks.rank))
    y, x = np.unravel_index(int(np.argmax(best.heatmap)), best.heatmap.shape)
    return best.z, int(y), int(x)


def heatmap_hits_embolus(key_slices: Sequence[KeySlice], embolus_mask: np.ndarray, *, tolerance_px: int = 2) -> bool:
    """True when the hottest heatmap point lies on the embolus mask (dilated by `tolerance_px` in-plane).

    `embolus_mask` is (Z, Y, X) bool in the series' slice order (the phantom's `embolus_mask`).
    """
    from scipy.ndimage import binary_dilation

    mask = np.asarray(embolus_mask, bool)
    z, y, x = hottest_point(key_slices)
    if mask.ndim != 3 or not (0 <= z < mask.shape[0]) or mask.shape[1:] != key_slices[0].heatmap.shape:
        raise KeyObjectError(
            f"embolus mask shape {mask.shape} does not fit the key slices (z={z}, slice {key_slices[0].heatmap.shape}); "
            "pass the mask of the same series"
        )
    plane = mask[z]
    if tolerance_px > 0:
        plane = binary_dilation(plane, iterations=tolerance_px)
    return bool(plane[y, x])
