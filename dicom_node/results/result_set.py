"""Build every result object of one analysed series in one call: SR, heatmap SCs, summary SC, KOS.

    result = build_results(series, windows, prediction, bundle_info, ResultOptions())
    for ds in result.datasets(): send(ds)

All UIDs are deterministic (`dicom_node.results.sr.result_uid`) from the source series UID, the
model UID, the revision and the object kind, so the same input and bundle give the same objects.
Series: SR (default number 9001), SC heatmaps + summary (9002), KOS (9003).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.log import get_logger

__all__ = ["ResultOptions", "ResultSet", "build_results"]

_log = get_logger("dicom_node.results.result_set")


@dataclass(frozen=True)
class ResultOptions:
    """What to build and how the result series are numbered and named."""

    key_slices: int = 3
    revision: int = 0
    sr_series_number: int = 9001
    sr_series_description: str = "AI PE detection report (research)"
    sc_series_number: int = 9002
    sc_series_description: str = "AI PE heatmaps (research)"
    kos: bool = True
    kos_series_number: int = 9003
    kos_series_description: str = "AI PE key images (research)"
    kos_title: str = "of_interest"
    hot_fraction: float = 0.5
    summary: bool = True
    institution_name: str | None = None

    def __post_init__(self) -> None:
        if self.key_slices < 1:
            raise ValueError(f"ResultOptions: key_slices={self.key_slices}; expected >= 1")
        if self.revision < 0:
            raise ValueError(f"ResultOptions: revision={self.revision}; expected >= 0")
        if not 0.0 <= self.hot_fraction < 1.0:
            raise ValueError(f"ResultOptions: hot_fraction={self.hot_fraction}; expected 0 <= hot_fraction < 1")


@dataclass(frozen=True)
class ResultSet:
    """The objects to send back into the study, and their UIDs."""

    sr: Dataset
    heatmap_scs: tuple[Dataset, ...]
    summary_sc: Dataset | None
    kos: Dataset | None
    key_slices: tuple  # tuple[KeySlice, ...]

    def datasets(self) -> list[Dataset]:
        """All objects, SR first."""
        out = [self.sr, *self.heatmap_scs]
        out += [d for d in (self.summary_sc, self.kos) if d is not None]
        return out

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(str(d.SOPInstanceUID) for d in self.datasets())

    @property
    def series_instance_uids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(str(d.SeriesInstanceUID) for d in self.datasets()))


def build_results(series, windows, prediction, bundle_info: Any = None, options: ResultOptions = ResultOptions(),
                  *, predecessor: Dataset | None = None) -> ResultSet:
    """SR + heatmap SCs + summary SC + optional KOS for one series (see module docstring)."""
    from dicom_node.results.kos import build_kos, select_key_slices
    from dicom_node.results.sc import build_heatmap_sc, build_summary_sc
    from dicom_node.results.sr import BundleInfo, build_sr, device_observer_context, result_uid

    t0 = time.perf_counter()
    bundle = BundleInfo.from_prediction(prediction) if bundle_info is None else BundleInfo.from_manifest(bundle_info)
    src, model, rev = series.series_instance_uid, bundle.model_uid, options.revision
    keys = select_key_slices(series, windows, prediction, k=options.key_slices)
    sr = build_sr(series, windows, prediction, bundle_manifest_info=bundle, key_slices=keys,
                  series_number=options.sr_series_number, series_description=options.sr_series_description,
                  revision=rev, predecessor=predecessor, institution_name=options.institution_name)
    sc_series = result_uid("sc-series", src, model, rev)
    scs = tuple(
        build_heatmap_sc(series, ks, probability=ks.window_probability,
                         series_instance_uid=sc_series, sop_instance_uid=result_uid("sc", src, model, rev, ks.rank),
                         series_number=options.sc_series_number, instance_number=ks.rank + 1,
                         manufacturer=bundle.manufacturer, hot_fraction=options.hot_fraction,
                         series_description=options.sc_series_description)
        for ks in keys
    )
    summary = None
    if options.summary:
        summary = build_summary_sc(series, prediction, series_instance_uid=sc_series,
                                   sop_instance_uid=result_uid("sc-summary", src, model, rev),
                                   series_number=options.sc_series_number, instance_number=len(scs) + 1,
                                   manufacturer=bundle.manufacturer, reference_z=keys[0].z,
                                   series_description=options.sc_series_description)
    kos = None
    if options.kos:
        kos = build_kos(series, keys, series_instance_uid=result_uid("kos-series", src, model, rev),
                        sop_instance_uid=result_uid("kos", src, model, rev),
                        series_number=options.kos_series_number, manufacturer=bundle.manufacturer,
                        title=options.kos_title, observer_device_context=device_observer_context(bundle),
                        series_description=options.kos_series_description)
    result = ResultSet(sr=sr, heatmap_scs=scs, summary_sc=summary, kos=kos, key_slices=keys)
    _log.info("results_built", series_uid=src, model_uid=model, revision=rev, sr_uid=str(sr.SOPInstanceUID),
              objects=len(result.datasets()), key_slices=[k.z for k in keys],
              duration_s=round(time.perf_counter() - t0, 3))
    return result
