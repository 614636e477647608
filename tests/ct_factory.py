"""Test data: small `phantoms` studies, and DICOM datasets built from any HU array with any
geometry (slope, orientation, spacing) for the loader's edge cases. No anatomy of its own."""

from __future__ import annotations

import functools

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid


@functools.lru_cache(maxsize=8)
def small_study(seed: int = 3, size: int = 64, n_slices: int = 24, thickness_mm: float = 2.5):
    """A small `dicom_node_phantoms.generate_study` study (cached: treat it as read-only)."""
    from dicom_node_phantoms import PhantomConfig, generate_study

    return generate_study(seed, PhantomConfig(rows=size, cols=size, n_slices=n_slices, slice_thickness_mm=thickness_mm))


def phantom_datasets(**kw) -> list[Dataset]:
    """Fresh (mutable) CT Image datasets of `small_study(**kw)`, in slice order."""
    from dicom_node_phantoms import study_datasets

    return study_datasets(small_study(**kw))


def make_series(
    hu: np.ndarray,
    *,
    pixel_spacing: float = 5.0,
    slice_spacing: float = 5.0,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin=(-160.0, -160.0, -75.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
) -> list[Dataset]:
    """One single-frame CT Image Storage dataset per slice, positions along the orientation's normal."""
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    stored = np.round((hu.astype(np.float64) - intercept) / slope).astype(np.uint16)
    out = []
    for z in range(hu.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "CT"
        ds.PatientName = "Factory^Chest"
        ds.PatientID = "FACTORY"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = z + 1
        ds.ImageOrientationPatient = [float(v) for v in o]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + z * slice_spacing * normal]
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = slice_spacing
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = stored[z].tobytes()
        out.append(ds)
    return out


def make_enhanced(datasets: list[Dataset], *, frame_order=None, per_frame_orientation: bool = False) -> Dataset:
    """One Enhanced CT multi-frame instance holding the given single-frame slices (in `frame_order`).

    Orientation, pixel measures and rescale go in the shared functional groups (or per frame when
    `per_frame_orientation`), plane positions per frame.
    """
    order = list(range(len(datasets))) if frame_order is None else list(frame_order)
    first = datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_uid
    for kw in ("Modality", "PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
               "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
               "HighBit", "PixelRepresentation"):
        setattr(ds, kw, getattr(first, kw))
    ds.NumberOfFrames = len(order)

    def item(**kw) -> Dataset:
        it = Dataset()
        for k, v in kw.items():
            setattr(it, k, v)
        return it

    orientation = item(ImageOrientationPatient=first.ImageOrientationPatient)
    shared = Dataset()
    shared.PixelMeasuresSequence = [item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)]
    shared.PixelValueTransformationSequence = [
        item(RescaleSlope=first.RescaleSlope, RescaleIntercept=first.RescaleIntercept, RescaleType="HU")
    ]
    if not per_frame_orientation:
        shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for i in order:
        fg = Dataset()
        fg.PlanePositionSequence = [item(ImagePositionPatient=datasets[i].ImagePositionPatient)]
        if per_frame_orientation:
            fg.PlaneOrientationSequence = [item(ImageOrientationPatient=datasets[i].ImageOrientationPatient)]
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = b"".join(datasets[i].PixelData for i in order)
    return ds
