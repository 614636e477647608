"""Synthetic CT pulmonary angiograms with exact ground truth, in the RSNA-STR PE layout.

numpy + scipy + pydicom only (no torch). One seed gives one study, always the same:

    study = generate_study(7, PhantomConfig(rows=128, cols=128, n_slices=140, slice_thickness_mm=2.5))
    study.hu            # (Z, Y, X) int16 HU, z increasing along the slice normal (feet -> head)
    study.embolus_mask  # (Z, Y, X) bool
    study.slice_labels  # (Z,) pe_present_on_image
    study.study_labels  # every RSNA study column incl. QA flags
    write_study(study, Path("out/train"))

Anatomy and emboli are drawn by `phantoms.anatomy`; compressed and malformed test variants
are written by `phantoms.variants`. `generate_dataset` writes a whole RSNA-style data set
(`train/`, `train.csv`, `masks/`). Label semantics follow the RSNA-STR challenge: `central_pe` when
an embolus sits in the main, left or right pulmonary artery; `leftsided_pe`/`rightsided_pe` when
one sits on that side (the left/right PA trunk counts for its side as well as central).
"""

from __future__ import annotations

import csv
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_node.labels import CSV_COLUMNS, QA_COLUMNS, STUDY_LABELS
from phantoms.anatomy import CENTRAL_KINDS, Canvas, Tissue, build_anatomy, paint_emboli, paint_mimic, place_emboli

__all__ = [
    "PhantomConfig",
    "PhantomStudy",
    "Tissue",
    "generate_study",
    "study_datasets",
    "write_study",
    "generate_dataset",
    "dataset_plan",
    "phantom_study_uid",
    "study_seed",
    "CT_IMAGE_STORAGE",
    "SMALLEST_EMBOLUS_VESSELS",
    "HU_INTERCEPT",
]

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
HU_INTERCEPT = -1024
_UID_TAG = "dicom-node-phantom-v1"
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


@dataclass(frozen=True)
class PhantomStudy:
    """One generated study: volumes, labels, geometry and identity (all deterministic for `seed`)."""

    seed: int
    hu: np.ndarray  # (Z, Y, X) int16
    embolus_mask: np.ndarray  # (Z, Y, X) bool
    tissue: np.ndarray  # (Z, Y, X) uint8, `Tissue` codes
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
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def is_positive(self) -> bool:
        return bool(self.slice_labels.any())


def _uid(seed: int, *parts) -> str:
    """Deterministic UID under the 2.25 root: a name-based (SHA-1, version 5) UUID of the seed and parts.

    (pydicom's `generate_uid(prefix=None)` ignores `entropy_srcs` and would be random.)
    """
    name = "/".join([_UID_TAG, str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def phantom_study_uid(seed: int) -> str:
    """StudyInstanceUID of the phantom study generated from `seed` (without generating it)."""
    return _uid(seed, "study")


def study_seed(dataset_seed: int, index: int) -> int:
    """Seed of study `index` of a data set generated with `dataset_seed` (stable across runs)."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1, dtype=np.uint32)[0])


def _spacing(rng: np.random.Generator, config: PhantomConfig) -> float:
    if config.pixel_spacing_mm is not None:
        return float(config.pixel_spacing_mm)
    return round(float(rng.uniform(330.0, 380.0)) / max(config.rows, config.cols), 6)


def _noise_bank(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """A few slices of in-plane correlated, unit-variance noise (CT noise texture), cut randomly per slice."""
    from scipy.ndimage import gaussian_filter

    white = rng.standard_normal((n, h, w), dtype=np.float32)
    smooth = gaussian_filter(white, sigma=(0, 0.9, 0.9))
    bank = 0.45 * white + smooth / smooth.std()
    return bank / bank.std()


def generate_study(seed: int, config: PhantomConfig = PhantomConfig(), *, kind: str | None = None) -> PhantomStudy:
    """Generate one CTPA study; the same `seed` and `config` always give the same study.

    `kind` (positive | negative | indeterminate) overrides the draw from `config.prevalence`;
    `generate_dataset` uses it to hit the configured case mix exactly.
    """
    from scipy.ndimage import gaussian_filter1d

    seed = int(seed)
    rng = np.random.default_rng(seed)
    ps = _spacing(rng, config)
    dz = float(config.slice_thickness_mm)
    shape = (config.n_slices, config.rows, config.cols)
    cv = Canvas(shape, (dz, ps, ps))

    r = rng.random()
    drawn = "positive" if r < config.prevalence else ("indeterminate" if r < config.prevalence + config.indeterminate_share else "negative")
    if kind is None:
        kind = drawn
    elif kind not in ("positive", "negative", "indeterminate"):
        raise ValueError(f"generate_study: kind={kind!r}; expected positive, negative or indeterminate")
    qa = {k: 0 for k in QA_COLUMNS}
    if kind == "indeterminate":
        reason = "contrast" if rng.random() < 0.6 else "motion"
        qa["qa_contrast" if reason == "contrast" else "qa_motion"] = 1
    else:
        reason = ""
    if reason == "contrast":
        pa = rng.uniform(85, 135)
        contrast = (pa, rng.uniform(70, 120), pa * rng.uniform(0.9, 1.05))
    else:
        pa = rng.uniform(250, 420)
        contrast = (pa, rng.uniform(150, 260), pa * rng.uniform(0.9, 1.05))
    if kind == "positive":
        ratio = rng.uniform(1.08, 1.6) if rng.random() < 0.4 else rng.uniform(0.6, 0.92)
    else:
        ratio = rng.uniform(0.6, 0.95) if rng.random() < 0.9 else rng.uniform(1.0, 1.2)
    an = build_anatomy(cv, rng, contrast=contrast, rv_lv_ratio=ratio, mediastinal_fat_mm=config.mediastinal_fat_mm)

    if kind != "indeterminate" and rng.random() < config.mimic_share:
        mimic = "flow_artifact" if (kind == "positive" or rng.random() < 0.6) else "true_filling_defect_not_pe"
        paint_mimic(cv, an.vessels, mimic, pa, rng)
        qa[mimic] = 1

    shown = []
    mask = np.zeros(shape, dtype=bool)
    if kind == "positive":
        c = rng.random()
        chronicity = "acute" if c < 0.72 else ("chronic" if c < 0.86 else "acute_and_chronic")
        n = min(1 + int(rng.poisson(1.5)), 6)
        if chronicity == "acute_and_chronic":
            n = max(n, 2)
        for attempt in range(8):
            emboli = place_emboli(rng, an.vessels, chronicity, n if attempt == 0 else 1,
                                  smallest=config.smallest_embolus_vessel)
            m, s = paint_emboli(cv, an.vessels, emboli, rng)
            mask |= m
            shown += s
            if shown:
                break
        if not shown:  # pragma: no cover - a main PA embolus always shows
            raise RuntimeError(f"phantom seed {seed}: no embolus could be placed; report this seed")

    labels = {k: 0 for k in STUDY_LABELS}
    if kind == "positive":
        vessel_side = {v.name: v.side for v in an.vessels}
        names = {e.vessel for e in shown}
        labels["central_pe"] = int(bool(names & set(CENTRAL_KINDS)))
        labels["leftsided_pe"] = int("lpa" in names or any(vessel_side[n] == "left" for n in names))
        labels["rightsided_pe"] = int("rpa" in names or any(vessel_side[n] == "right" for n in names))
        kinds = {e.kind for e in shown}
        labels["chronic_pe"] = int(kinds == {"chronic"})
        labels["acute_and_chronic_pe"] = int(kinds == {"acute", "chronic"})
        labels["rv_lv_ratio_gte_1"] = int(ratio >= 1.0)
        labels["rv_lv_ratio_lt_1"] = int(ratio < 1.0)
    else:
        labels["negative_exam_for_pe" if kind == "negative" else "indeterminate"] = 1
    labels.update(qa)

    hu = cv.hu
    noise = config.noise_hu * rng.uniform(0.8, 1.3)
    if reason == "motion":
        shift = max(1, int(round(rng.uniform(3, 7) / ps)))
        hu = 0.65 * hu + 0.35 * np.roll(hu, shift, axis=1)
        hu = gaussian_filter1d(hu, sigma=rng.uniform(1.5, 3.0) / ps, axis=1)
        noise *= rng.uniform(1.6, 2.2)
    Z, H, W = shape
    pad = 24
    bank = _noise_bank(rng, min(Z, 24), H + pad, W + pad)
    u = (np.arange(Z) + 0.5) / Z
    sig = noise * (1.0 + 0.35 * (2 * np.abs(u - 0.5)) ** 2)
    picks = rng.integers(0, bank.shape[0], Z)
    offs = rng.integers(0, pad + 1, (Z, 2))
    for k in range(Z):
        hu[k] += sig[k] * bank[picks[k], offs[k, 0]:offs[k, 0] + H, offs[k, 1]:offs[k, 1] + W]
    hu16 = np.clip(np.rint(hu), HU_INTERCEPT, 3071).astype(np.int16)

    x0 = round(float(cv.x[0]) + rng.uniform(-15, 15), 3)
    y0 = round(float(cv.y[0]) + rng.uniform(-15, 15), 3)
    z0 = round(float(rng.uniform(-420.0, -120.0)), 3)
    positions = np.stack([np.full(Z, x0), np.full(Z, y0), np.round(z0 + np.arange(Z) * dz, 3)], axis=1)
    birth = f"{int(rng.integers(1935, 2000))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    sdate = f"2024{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    stime = f"{int(rng.integers(7, 22)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    return PhantomStudy(
        seed=seed,
        hu=hu16,
        embolus_mask=mask,
        tissue=cv.tissue,
        slice_labels=mask.any(axis=(1, 2)).astype(np.int64),
        study_labels=labels,
        kind=kind,
        pixel_spacing_mm=(ps, ps),
        slice_thickness_mm=dz,
        spacing_between_slices_mm=dz,
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        positions=positions,
        study_uid=phantom_study_uid(seed),
        series_uid=_uid(seed, "series", 1),
        frame_of_reference_uid=_uid(seed, "frame"),
        sop_uids=tuple(_uid(seed, "sop", 1, k) for k in range(Z)),
        patient_name=f"PHANTOM^{seed}",
        patient_id=f"PH{seed}",
        patient_birth_date=birth,
        patient_sex="F" if rng.random() < 0.5 else "M",
        study_date=sdate,
        study_time=stime,
        accession_number=f"A{seed % 10**12:012d}",
        rv_lv_ratio=round(float(ratio), 4),
        n_emboli=len(shown),
        extra={"reason": reason, "pa_hu": float(pa), "emboli": tuple((e.vessel, e.kind) for e in shown)},
    )


def _ds(v: float) -> str:
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def base_dataset(study: PhantomStudy, *, sop_class: str = CT_IMAGE_STORAGE) -> Dataset:
    """Patient, study, equipment and frame-of-reference attributes shared by every instance of the study."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic"
    ds.InstitutionName = "dicom-node phantom"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM01"
    ds.StudyDescription = "CT PULMONARY ANGIOGRAM"
    ds.ManufacturerModelName = "training.phantom"  # kept as written by earlier releases: same phantoms, same bytes
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.ContrastBolusAgent = "IOHEXOL 350 MG/ML"
    ds.ContrastBolusRoute = "IV"
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "phantom-1"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyID = "1"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    return ds


def _file_meta(ds: Dataset, transfer_syntax: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta


def study_datasets(study: PhantomStudy, *, transfer_syntax: str = ExplicitVRLittleEndian,
                   series_description: str | None = None) -> list[Dataset]:
    """One CT Image Storage instance per slice (uncompressed, stored value = HU + 1024, 12 bits)."""
    Z, H, W = study.shape
    desc = series_description or f"CTPA {_ds(study.slice_thickness_mm)}mm"
    out = []
    for k in range(Z):
        ds = base_dataset(study)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPInstanceUID = study.sop_uids[k]
        ds.SeriesDescription = desc
        ds.SliceThickness = _ds(study.slice_thickness_mm)
        ds.SpacingBetweenSlices = _ds(study.spacing_between_slices_mm)
        ds.KVP = "100"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(study.pixel_spacing_mm[1] * W)
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "250"
        ds.ConvolutionKernel = "STANDARD"
        ds.SeriesInstanceUID = study.series_uid
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        # head-first scan numbered from the top: InstanceNumber runs against the position
        ds.InstanceNumber = Z - k
        ds.ImagePositionPatient = [_ds(v) for v in study.positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in study.image_orientation]
        ds.SliceLocation = _ds(float(study.positions[k][2]))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = H, W
        ds.PixelSpacing = [_ds(v) for v in study.pixel_spacing_mm]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "100", "700"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(HU_INTERCEPT), "1", "HU"
        ds.PixelData = (study.hu[k].astype(np.int32) - HU_INTERCEPT).astype("<u2").tobytes()
        _file_meta(ds, transfer_syntax)
        out.append(ds)
    return out


def write_study(study: PhantomStudy, root: Path, *, transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """Write `root/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`; compressed syntaxes go through `phantom_variants`."""
    root = Path(root)
    if UID(transfer_syntax).is_compressed:
        from phantoms.variants import write_compressed

        return write_compressed(study, root, transfer_syntax)
    series_dir = root / study.study_uid / study.series_uid
    series_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in study_datasets(study, transfer_syntax=transfer_syntax):
        p = series_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def csv_rows(study: PhantomStudy) -> list[dict]:
    """The study's `train.csv` rows (one per slice, in slice order)."""
    rows = []
    for k, sop in enumerate(study.sop_uids):
        row = {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": study.series_uid, "SOPInstanceUID": sop,
               "pe_present_on_image": int(study.slice_labels[k])}
        row.update({c: int(study.study_labels[c]) for c in CSV_COLUMNS if c in study.study_labels})
        rows.append({c: row[c] for c in CSV_COLUMNS})
    return rows


def _write_one(args) -> tuple[list[dict], int, int]:
    seed, config, out, kind = args
    study = generate_study(seed, config, kind=kind)
    paths = write_study(study, out / "train")
    np.savez_compressed(out / "masks" / f"{study.study_uid}.npz", mask=study.embolus_mask,
                        sop_uids=np.array(study.sop_uids), slice_labels=study.slice_labels)
    return csv_rows(study), len(paths), int(study.is_positive)


def dataset_plan(n_studies: int, seed: int, config: PhantomConfig = PhantomConfig()) -> list[tuple[int, str]]:
    """(study seed, kind) of each study `generate_dataset(out, n_studies, seed, config)` writes, in order:
    an exact case mix (round(n * prevalence) positives, round(n * indeterminate_share) indeterminate)
    in a seeded order. `generate_study(seed, config, kind=kind)` gives the study back."""
    n_pos = int(round(n_studies * config.prevalence))
    n_ind = min(int(round(n_studies * config.indeterminate_share)), n_studies - n_pos)
    kinds = ["positive"] * n_pos + ["indeterminate"] * n_ind + ["negative"] * (n_studies - n_pos - n_ind)
    np.random.default_rng(np.random.SeedSequence([seed, 7919])).shuffle(kinds)
    return [(study_seed(seed, i), kinds[i]) for i in range(n_studies)]


def generate_dataset(out: Path, n_studies: int, seed: int, config: PhantomConfig = PhantomConfig(),
                     *, workers: int | None = None, progress: bool = True) -> Path:
    """Write `out/train/...`, `out/train.csv` and `out/masks/<StudyUID>.npz` for `n_studies` studies.

    The case mix is exact: round(n * prevalence) positives and round(n * indeterminate_share)
    indeterminate studies, in a seeded order. Each mask file holds `mask` (Z, Y, X) bool,
    `sop_uids` (Z,) in slice order (z increasing along the normal) and `slice_labels` (Z,).
    """
    from tqdm import tqdm

    out = Path(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    jobs = [(s, config, out, kind) for s, kind in dataset_plan(n_studies, seed, config)]
    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=n_studies, desc="phantom studies", unit="study", disable=not progress)
    if workers > 1 and n_studies > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            for res in pool.map(_write_one, jobs):
                results.append(res)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_write_one(job))
            bar.update(1)
    bar.close()
    with open(out / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for rows, _, _ in results:
            w.writerows(rows)
    summary = {"studies": n_studies, "positives": sum(r[2] for r in results), "files": sum(r[1] for r in results),
               "seconds": round(time.perf_counter() - t0, 2)}
    (out / "phantom_summary.txt").write_text(" ".join(f"{k}={v}" for k, v in summary.items()) + "\n")
    return out
