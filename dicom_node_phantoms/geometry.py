"""Configuration, geometry and identity of a phantom study (numpy only; no drawing, no DICOM).

    config = PhantomConfig(rows=128, cols=128, n_slices=140, slice_thickness_mm=2.5)
    phantom_study_uid(7)          # StudyInstanceUID of seed 7, without generating the study
    phantom_uid(7, "sop", 1, 0)   # any other UID of the study, from the seed and a path of parts

`PhantomConfig` says what to generate and rejects values the generator cannot honour;
`PhantomStudy` is what `dicom_node_phantoms.study.generate_study` returns. Every UID is a function of the
seed alone (a name-based UUID under the 2.25 root), so the same seed gives the same UIDs on every
machine and a caller can know a study's UID before (or instead of) generating it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "PhantomConfig",
    "PhantomStudy",
    "DEFAULT_CONFIG",
    "HU_INTERCEPT",
    "SMALLEST_EMBOLUS_VESSELS",
    "UID_NAMESPACE_TAG",
    "phantom_uid",
    "phantom_study_uid",
    "draw_pixel_spacing",
]

#: RescaleIntercept of every phantom image: stored value = HU + 1024 (12 bits, so HU -1024..3071)
HU_INTERCEPT = -1024
#: first part of the name every phantom UID is hashed from; changing it changes every UID ever written
UID_NAMESPACE_TAG = "dicom-node-phantom-v1"
#: values of `PhantomConfig.smallest_embolus_vessel` (and of `--smallest-embolus-vessel`)
SMALLEST_EMBOLUS_VESSELS = ("subsegmental", "segmental", "lobar", "central")


@dataclass(frozen=True)
class PhantomConfig:
    """Size, sampling and case mix of generated studies.

    `pixel_spacing_mm=None` draws a field of view of 330-380 mm per study and divides it by the
    image size (0.64-0.74 mm at 512 px, 2.6-3.0 mm at 128 px). `prevalence` is the share of
    PE-positive studies, `indeterminate_share` the share of non-diagnostic ones (poor contrast or
    motion); the rest are negative.
    """

    rows: int = 512
    cols: int = 512
    n_slices: int = 300
    slice_thickness_mm: float = 1.25
    pixel_spacing_mm: float | None = None
    prevalence: float = 0.5
    indeterminate_share: float = 0.08
    noise_hu: float = 20.0
    mimic_share: float = 0.1
    #: smallest artery that may hold an embolus: "subsegmental" (every site, the default),
    #: "segmental" or "lobar" (for coarse phantoms whose pixels are wider than a small embolus), or
    #: "central" (main, left and right pulmonary arteries only)
    smallest_embolus_vessel: str = "subsegmental"
    #: fat around the main, left and right pulmonary arteries in the mediastinum (mm; 0 = none,
    #: the arteries then border soft tissue of an embolus's density)
    mediastinal_fat_mm: float = 0.0

    def __post_init__(self) -> None:
        if not (16 <= self.rows <= 1024 and 16 <= self.cols <= 1024):
            raise ValueError(f"PhantomConfig: image size {self.rows}x{self.cols} px; expected 16-1024 px per side")
        if self.n_slices < 8:
            raise ValueError(f"PhantomConfig: n_slices={self.n_slices}; expected at least 8")
        if not 1.0 <= self.slice_thickness_mm <= 2.5:
            raise ValueError(f"PhantomConfig: slice_thickness_mm={self.slice_thickness_mm}; expected 1-2.5 mm")
        if self.pixel_spacing_mm is not None and not 0.2 <= self.pixel_spacing_mm <= 5.0:
            raise ValueError(f"PhantomConfig: pixel_spacing_mm={self.pixel_spacing_mm}; expected 0.2-5 mm")
        if self.smallest_embolus_vessel not in SMALLEST_EMBOLUS_VESSELS:
            raise ValueError(f"PhantomConfig: smallest_embolus_vessel={self.smallest_embolus_vessel!r}; "
                             "expected one of " + ", ".join(repr(v) for v in SMALLEST_EMBOLUS_VESSELS))
        if not 0.0 <= self.mediastinal_fat_mm <= 10.0:
            raise ValueError(f"PhantomConfig: mediastinal_fat_mm={self.mediastinal_fat_mm}; expected 0-10 mm")
        if not (0 <= self.prevalence <= 1 and 0 <= self.indeterminate_share <= 1 - self.prevalence):
            raise ValueError(
                f"PhantomConfig: prevalence={self.prevalence}, indeterminate_share={self.indeterminate_share}; "
                "expected both in [0, 1] with a sum <= 1"
            )


#: the default of every `config` parameter: 512 x 512 x 300 at 1.25 mm, half positive (frozen, so one
#: instance can be shared, as a module-level default must be)
DEFAULT_CONFIG = PhantomConfig()


@dataclass(frozen=True)
class PhantomStudy:
    """One generated study: volumes, labels, geometry and identity (all deterministic for `seed`)."""

    seed: int
    hu: np.ndarray  # (Z, Y, X) int16
    embolus_mask: np.ndarray  # (Z, Y, X) bool
    tissue: np.ndarray  # (Z, Y, X) uint8, `dicom_node_phantoms.anatomy.Tissue` codes
    slice_labels: np.ndarray  # (Z,) int, pe_present_on_image
    study_labels: dict[str, int]  # STUDY_LABELS + QA_COLUMNS
    kind: str  # positive | negative | indeterminate
    pixel_spacing_mm: tuple[float, float]  # (row, column)
    slice_thickness_mm: float
    spacing_between_slices_mm: float
    image_orientation: tuple[float, ...]
    positions: np.ndarray  # (Z, 3) ImagePositionPatient of each slice
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: tuple[str, ...]
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    rv_lv_ratio: float
    n_emboli: int
    #: how the study came about: "reason" (indeterminate: contrast | motion | ""), "pa_hu", "emboli" ((vessel, kind), ...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def is_positive(self) -> bool:
        return bool(self.slice_labels.any())


def phantom_uid(seed: int, *parts: object) -> str:
    """Deterministic UID under the 2.25 root: a name-based (SHA-1, version 5) UUID of the seed and parts.

    (pydicom's `generate_uid(prefix=None)` ignores `entropy_srcs` and would be random.) The parts
    name the object: ("series", 1), ("sop", 1, k), ("series", "localizer"), ...; two objects of
    one study must not share a path of parts.
    """
    name = "/".join([UID_NAMESPACE_TAG, str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def phantom_study_uid(seed: int) -> str:
    """StudyInstanceUID of the phantom study generated from `seed` (without generating it)."""
    return phantom_uid(seed, "study")


def draw_pixel_spacing(rng: np.random.Generator, config: PhantomConfig) -> float:
    """In-plane pixel spacing (mm) of one study: the configured one, or a 330-380 mm field of view / image size.

    It draws from `rng` only when `config.pixel_spacing_mm` is None, so one seed gives other
    anatomy with a fixed spacing than without; earlier releases did the same, and drawing a
    value that is then thrown away would change every study already generated.
    """
    if config.pixel_spacing_mm is not None:
        return float(config.pixel_spacing_mm)
    return round(float(rng.uniform(330.0, 380.0)) / max(config.rows, config.cols), 6)
