"""Small hand-made CT series for the loader's edge cases (the realistic studies come from
`training.phantom`). A simple chest: air, an elliptic body, two ellipsoid lungs, a bright vessel."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def chest_volume(n_slices: int = 30, rows: int = 64, cols: int = 64, lungs: bool = True) -> np.ndarray:
    """(Z, Y, X) int16 HU: body ellipse at 40 HU, lungs at -850 HU (if `lungs`), air -1000."""
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, n_slices), np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij"
    )
    hu = np.full((n_slices, rows, cols), -1000, dtype=np.int16)
    hu[(y / 0.75) ** 2 + (x / 0.9) ** 2 < 1] = 40
    if lungs:
        for cx in (-0.4, 0.4):
            hu[((x - cx) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 0.8) ** 2 < 1] = -850
    hu[(x / 0.08) ** 2 + ((y + 0.1) / 0.08) ** 2 < 1] = 300  # a contrast-filled vessel
    return hu


def make_series(
    hu: np.ndarray | None = None,
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
    hu = chest_volume() if hu is None else hu
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
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID = CT_IMAGE_STORAGE
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


ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


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
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
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
