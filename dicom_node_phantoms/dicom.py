"""DICOM files of a phantom study: one CT Image Storage instance per slice, plain or lossless compressed.

    datasets = study_datasets(study)            # pydicom Datasets, in slice order, with file meta
    paths = write_study(study, Path("out"))     # out/<StudyUID>/<SeriesUID>/<SOPUID>.dcm

The element values are part of the phantom's contract: the same study always gives the same
bytes (the node's golden tests compare results written from them), so a change here is a change
to every phantom ever written. Stored value = HU + 1024 (`HU_INTERCEPT`), 12 bits stored.

Lossless compression uses pydicom's encoders (RLE, JPEG-LS via pyjpegls/pylibjpeg, JPEG 2000 via
pylibjpeg-openjpeg) and falls back to dcmtk (`dcmcjpls`, `dcmcrle`) or GDCM (`gdcmconv --j2k`);
JPEG lossless (process 14, SV1) always uses dcmtk's `dcmcjpeg`. The helpers `base_dataset`,
`decimal_string` and `add_file_meta` are public so that `dicom_node_phantoms.variants` builds its odd series
from the same attributes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node_phantoms.geometry import HU_INTERCEPT, PhantomStudy

__all__ = [
    "decimal_string",
    "base_dataset",
    "add_file_meta",
    "study_datasets",
    "study_datasets_slice",
    "series_directory",
    "save_dataset",
    "write_study",
    "write_compressed",
    "COMPRESSED_SYNTAXES",
]

_TOOLS: dict[UID, list[str]] = {  # transfer syntax -> external command (input, output appended)
    JPEGLSLossless: ["dcmcjpls", "+ll"],
    RLELossless: ["dcmcrle"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEG2000Lossless: ["gdcmconv", "--j2k"],
}
#: the lossless compressed transfer syntaxes `write_study` / `write_compressed` can write
COMPRESSED_SYNTAXES: tuple[UID, ...] = tuple(_TOOLS)


def decimal_string(v: float) -> str:
    """`v` as a DICOM DS value: at most 6 decimals, no trailing zeros, never "-0" or ""."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def base_dataset(study: PhantomStudy, *, sop_class: str = CTImageStorage) -> Dataset:
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


def add_file_meta(ds: Dataset, transfer_syntax: str) -> None:
    """Give `ds` its file meta information (SOP class and instance from `ds`, the given transfer syntax).

    Call it after SOPClassUID and SOPInstanceUID are final: the meta copies them.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta


def study_datasets(study: PhantomStudy, *, transfer_syntax: str = ExplicitVRLittleEndian,
                   series_description: str | None = None) -> list[Dataset]:
    """One CT Image Storage instance per slice (uncompressed, stored value = HU + 1024, 12 bits)."""
    Z, H, W = study.shape
    desc = series_description or f"CTPA {decimal_string(study.slice_thickness_mm)}mm"
    out = []
    for k in range(Z):
        ds = base_dataset(study)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPInstanceUID = study.sop_uids[k]
        ds.SeriesDescription = desc
        ds.SliceThickness = decimal_string(study.slice_thickness_mm)
        ds.SpacingBetweenSlices = decimal_string(study.spacing_between_slices_mm)
        ds.KVP = "100"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = decimal_string(study.pixel_spacing_mm[1] * W)
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
        ds.ImagePositionPatient = [decimal_string(v) for v in study.positions[k]]
        ds.ImageOrientationPatient = [decimal_string(v) for v in study.image_orientation]
        ds.SliceLocation = decimal_string(float(study.positions[k][2]))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = H, W
        ds.PixelSpacing = [decimal_string(v) for v in study.pixel_spacing_mm]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "100", "700"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(HU_INTERCEPT), "1", "HU"
        ds.PixelData = (study.hu[k].astype(np.int32) - HU_INTERCEPT).astype("<u2").tobytes()
        add_file_meta(ds, transfer_syntax)
        out.append(ds)
    return out


def study_datasets_slice(study: PhantomStudy, k: int) -> Dataset:
    """The CT Image dataset of slice `k` alone (cheaper than building the whole series)."""
    one = PhantomStudy(**{**study.__dict__, "hu": study.hu[k:k + 1], "positions": study.positions[k:k + 1],
                          "sop_uids": study.sop_uids[k:k + 1]})
    ds = study_datasets(one)[0]
    ds.InstanceNumber = study.shape[0] - k
    return ds


def series_directory(root: Path, ds: Dataset) -> Path:
    """`root/<StudyInstanceUID>/<SeriesInstanceUID>/` of `ds`, created if missing."""
    d = Path(root) / ds.StudyInstanceUID / ds.SeriesInstanceUID
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_dataset(ds: Dataset, path: Path) -> Path:
    """Write `ds` as a DICOM file (preamble and file meta enforced) and return `path`."""
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(study: PhantomStudy, root: Path, *, transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """Write `root/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`; compressed syntaxes go through `write_compressed`."""
    root = Path(root)
    if UID(transfer_syntax).is_compressed:
        return write_compressed(study, root, transfer_syntax)
    series_dir = root / study.study_uid / study.series_uid
    series_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in study_datasets(study, transfer_syntax=transfer_syntax):
        p = series_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _compress_with_tool(ds: Dataset, syntax: UID, path: Path) -> Path:
    cmd = _TOOLS[syntax]
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"phantom variant {syntax.name}: no pydicom encoder and no `{cmd[0]}` on PATH; "
                           "install pylibjpeg plugins or the dcmtk/libgdcm-tools packages")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.dcm"
        save_dataset(ds, src)
        res = subprocess.run([*cmd, str(src), str(path)], capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise RuntimeError(f"phantom variant {syntax.name}: `{' '.join(cmd)}` failed: {res.stderr.strip()[:300]}")
    return path


def _write_compressed_ds(ds: Dataset, syntax: UID, path: Path) -> Path:
    # pydicom has no JPEG lossless (process 14) encoder; for the others it may lack the plugin,
    # and then the external tool gets the dataset back in its uncompressed form
    if syntax != JPEGLosslessSV1:
        try:
            ds.compress(syntax, generate_instance_uid=False)
            return save_dataset(ds, path)
        except (RuntimeError, NotImplementedError, ValueError):
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return _compress_with_tool(ds, syntax, path)


def write_compressed(study: PhantomStudy, root: Path, transfer_syntax: str) -> list[Path]:
    """Write the study with a lossless compressed transfer syntax (one of `COMPRESSED_SYNTAXES`)."""
    syntax = UID(transfer_syntax)
    if syntax not in _TOOLS:
        raise ValueError(f"phantom: transfer syntax {syntax} ({syntax.name}) is not supported; "
                         f"expected one of {', '.join(f'{u} ({u.name})' for u in _TOOLS)}")
    paths = []
    for ds in study_datasets(study):
        paths.append(_write_compressed_ds(ds, syntax, series_directory(root, ds) / f"{ds.SOPInstanceUID}.dcm"))
    return paths
