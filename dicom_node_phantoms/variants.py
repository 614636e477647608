"""Test variants of a phantom study: compressed syntaxes, odd file orders, broken and extra series.

    write_variant(study, root, "jpeg-ls")   # -> list of written paths

Every variant writes under `root/<StudyUID>/<SeriesUID>/` and is a function of the study alone
(its own random draws are seeded from `study.seed`), so a test that fails on one variant fails
the same way on every run. The compressed variants are `dicom_node_phantoms.dicom.write_compressed` under a
short name; the others bend one thing the loader must cope with (a missing or duplicated slice,
file names and instance numbers that disagree with the positions, an oblique orientation, a
localizer and a second series in the same study, one Enhanced CT multi-frame instance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node_phantoms.dicom import (
    add_file_meta,
    base_dataset,
    decimal_string,
    save_dataset,
    series_directory,
    study_datasets,
    study_datasets_slice,
    write_compressed,
)
from dicom_node_phantoms.geometry import HU_INTERCEPT, PhantomStudy, phantom_uid

__all__ = ["VARIANTS", "COMPRESSED", "write_variant", "enhanced_dataset"]

#: variant name -> transfer syntax of the lossless compressed variants
COMPRESSED: dict[str, UID] = {
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "jpeg-lossless": JPEGLosslessSV1,
}

VARIANTS: tuple[str, ...] = (
    *COMPRESSED,
    "missing-slice",
    "duplicate-instance",
    "localizer-and-second-series",
    "oblique",
    "enhanced-multiframe",
    "shuffled",
    "reversed",
)


def write_variant(study: PhantomStudy, root: Path, variant: str) -> list[Path]:
    """Write one test variant of `study` under `root` (see `VARIANTS`); returns the written files."""
    root = Path(root)
    if variant in COMPRESSED:
        return write_compressed(study, root, COMPRESSED[variant])
    if variant == "enhanced-multiframe":
        ds = enhanced_dataset(study)
        return [save_dataset(ds, series_directory(root, ds) / f"{ds.SOPInstanceUID}.dcm")]
    if variant not in VARIANTS:
        raise ValueError(f"phantom: unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    dss = study_datasets(study)
    Z = len(dss)
    rng = np.random.default_rng([study.seed, 0xBEEF])
    names = [f"{ds.SOPInstanceUID}.dcm" for ds in dss]
    paths: list[Path] = []
    if variant == "missing-slice":
        del dss[Z // 2], names[Z // 2]
    elif variant == "duplicate-instance":
        k = Z // 3
        paths.append(save_dataset(dss[k], series_directory(root, dss[k]) / f"{dss[k].SOPInstanceUID}.copy.dcm"))
    elif variant in ("shuffled", "reversed"):
        order = rng.permutation(Z) if variant == "shuffled" else np.arange(Z)[::-1]
        names = [f"IM{int(order[k]):05d}.dcm" for k in range(Z)]
        for k, ds in enumerate(dss):
            ds.InstanceNumber = int(order[k]) + 1
    elif variant == "oblique":
        theta = np.deg2rad(float(rng.uniform(8, 20)))
        row = np.array([1.0, 0.0, 0.0])
        col = np.array([0.0, np.cos(theta), np.sin(theta)])
        normal = np.cross(row, col)
        p0 = study.positions[0]
        for k, ds in enumerate(dss):
            ds.ImageOrientationPatient = [decimal_string(v) for v in (*row, *col)]
            ds.ImagePositionPatient = [decimal_string(v) for v in p0 + k * study.spacing_between_slices_mm * normal]
            del ds.SliceLocation
    elif variant == "localizer-and-second-series":
        for ds in (_localizer(study), *_thick_series(study)):
            paths.append(save_dataset(ds, series_directory(root, ds) / f"{ds.SOPInstanceUID}.dcm"))
    for ds, name in zip(dss, names):
        paths.append(save_dataset(ds, series_directory(root, ds) / name))
    return paths


def _pixels(hu: np.ndarray) -> bytes:
    return (np.clip(hu, HU_INTERCEPT, 3071).astype(np.int32) - HU_INTERCEPT).astype("<u2").tobytes()


def _image_pixel(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0


def _localizer(study: PhantomStudy) -> Dataset:
    """A frontal scout: mean attenuation along y, one CT LOCALIZER image in its own series."""
    Z, H, W = study.shape
    mu = np.clip(study.hu.astype(np.float32) + 1000, 0, None).mean(axis=1)  # (Z, X)
    img = (mu / max(float(mu.max()), 1.0) * 2000 - 1000)[::-1]  # top row = head
    ds = base_dataset(study)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesInstanceUID = phantom_uid(study.seed, "series", "localizer")
    ds.SOPInstanceUID = phantom_uid(study.seed, "sop", "localizer", 0)
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 1, 1, 1
    ds.SeriesDescription = "TOPOGRAM"
    ds.KVP = "120"
    top = study.positions[-1]
    ds.ImagePositionPatient = [decimal_string(top[0]), "0", decimal_string(top[2])]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [decimal_string(study.slice_thickness_mm), decimal_string(study.pixel_spacing_mm[1])]
    ds.SliceThickness = "1"
    _image_pixel(ds, Z, W)
    ds.RescaleIntercept, ds.RescaleSlope = str(HU_INTERCEPT), "1"
    ds.PixelData = _pixels(np.rint(img))
    add_file_meta(ds, ExplicitVRLittleEndian)
    return ds


def _thick_series(study: PhantomStudy, thickness_mm: float = 5.0) -> list[Dataset]:
    """A second, thick-slice axial series of the same study (slabs averaged from the thin one)."""
    Z = study.shape[0]
    n = max(2, int(round(thickness_mm / study.slice_thickness_mm)))
    thick = n * study.slice_thickness_mm
    out = []
    for j, k0 in enumerate(range(0, Z - n + 1, n)):
        ds = study_datasets_slice(study, k0)
        ds.SeriesInstanceUID = phantom_uid(study.seed, "series", "thick")
        ds.SOPInstanceUID = phantom_uid(study.seed, "sop", "thick", j)
        ds.SeriesNumber = 3
        ds.InstanceNumber = j + 1
        ds.SeriesDescription = f"CHEST {decimal_string(thick)}mm"
        ds.SliceThickness = ds.SpacingBetweenSlices = decimal_string(thick)
        centre = study.positions[k0:k0 + n].mean(axis=0)
        ds.ImagePositionPatient = [decimal_string(v) for v in centre]
        ds.SliceLocation = decimal_string(float(centre[2]))
        ds.PixelData = _pixels(np.rint(study.hu[k0:k0 + n].astype(np.float32).mean(axis=0)))
        add_file_meta(ds, ExplicitVRLittleEndian)
        out.append(ds)
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _item(**kw: Any) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def enhanced_dataset(study: PhantomStudy) -> Dataset:
    """The whole series as one Enhanced CT Image Storage instance with per-frame functional groups."""
    Z, H, W = study.shape
    ds = base_dataset(study, sop_class=EnhancedCTImageStorage)
    for name in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "StationName",
                 "ContrastBolusAgent", "ContrastBolusRoute", "PatientPosition"):
        delattr(ds, name)
    ds.PatientPosition = "HFS"
    ds.SeriesDate, ds.SeriesTime = study.study_date, study.study_time
    ds.SeriesInstanceUID = phantom_uid(study.seed, "series", "enhanced")
    ds.SOPInstanceUID = phantom_uid(study.seed, "sop", "enhanced", 0)
    ds.SeriesNumber, ds.InstanceNumber = 4, 1
    ds.SeriesDescription = f"CTPA {decimal_string(study.slice_thickness_mm)}mm ENHANCED"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = study.study_date + study.study_time
    ds.AcquisitionDuration = 5.0
    ds.ContentQualification = "RESEARCH"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence()
    _image_pixel(ds, H, W)
    ds.NumberOfFrames = Z
    dim_uid = phantom_uid(study.seed, "dimension-organization")
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00200032, FunctionalGroupPointer=0x00209113,
              DimensionDescriptionLabel="Image Position"),
    ])
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([_item(
        PixelSpacing=[decimal_string(v) for v in study.pixel_spacing_mm], SliceThickness=decimal_string(study.slice_thickness_mm),
        SpacingBetweenSlices=decimal_string(study.spacing_between_slices_mm))])
    shared.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=[decimal_string(v) for v in study.image_orientation])])
    anat = _item(FrameLaterality="U")
    anat.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Thorax")])
    shared.FrameAnatomySequence = Sequence([anat])
    shared.PixelValueTransformationSequence = Sequence([_item(
        RescaleIntercept=str(HU_INTERCEPT), RescaleSlope="1", RescaleType="HU")])
    shared.FrameVOILUTSequence = Sequence([_item(WindowCenter="100", WindowWidth="700")])
    shared.CTImageFrameTypeSequence = Sequence([_item(
        FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")])
    shared.CTAcquisitionTypeSequence = Sequence([_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO",
                                                       FluoroscopyFlag="NO")])
    shared.CTAcquisitionDetailsSequence = Sequence([_item(
        DataCollectionDiameter=500.0, GantryDetectorTilt=0.0, TableHeight=160.0, RotationDirection="CW",
        RevolutionTime=0.5, SingleCollimationWidth=0.625, TotalCollimationWidth=40.0)])
    shared.CTTableDynamicsSequence = Sequence([_item(TableSpeed=80.0, TableFeedPerRotation=40.0,
                                                     SpiralPitchFactor=1.0)])
    shared.CTGeometrySequence = Sequence([_item(DistanceSourceToDetector=1040.0,
                                                DistanceSourceToDataCollectionCenter=570.0)])
    shared.CTReconstructionSequence = Sequence([_item(
        ConvolutionKernel="STANDARD", ConvolutionKernelGroup="SOFT_TISSUE",
        ReconstructionDiameter=float(study.pixel_spacing_mm[1] * W), ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ReconstructionPixelSpacing=[float(v) for v in study.pixel_spacing_mm], ReconstructionAngle=360.0,
        ImageFilter="NONE")])
    shared.CTExposureSequence = Sequence([_item(
        ExposureTimeInms=500.0, XRayTubeCurrentInmA=250.0, ExposureInmAs=125.0, ExposureModulationType="NONE")])
    shared.CTXRayDetailsSequence = Sequence([_item(
        KVP=100.0, FocalSpots=[1.0], FilterType="BODY", FilterMaterial=["ALUMINUM"])])
    shared.IrradiationEventIdentificationSequence = Sequence([_item(
        IrradiationEventUID=phantom_uid(study.seed, "irradiation"))])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(Z):
        f = Dataset()
        f.FrameContentSequence = Sequence([_item(
            FrameAcquisitionDateTime=ds.AcquisitionDateTime, FrameReferenceDateTime=ds.AcquisitionDateTime,
            FrameAcquisitionDuration=5.0, DimensionIndexValues=[k + 1])])
        f.PlanePositionSequence = Sequence([_item(ImagePositionPatient=[decimal_string(v) for v in study.positions[k]])])
        pos = study.positions[k]
        f.CTPositionSequence = Sequence([_item(
            TablePosition=float(pos[2]), ReconstructionTargetCenterPatient=[0.0, 0.0, float(pos[2])],
            DataCollectionCenterPatient=[0.0, 0.0, float(pos[2])])])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = _pixels(study.hu)
    add_file_meta(ds, ExplicitVRLittleEndian)
    return ds

