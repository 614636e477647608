"""Build every result object of one analysed series in one call: SR, heatmap SCs, summary SC, KOS.

    result = build_results(series, windows, prediction, bundle_info, ResultOptions.from_config(config.results))
    for ds in result.datasets(): send(ds)

All UIDs are deterministic (`dicom_node.results.uids.result_uid`) from the source series UID, the
model UID, the revision and the object kind, so the same input and bundle give the same objects.

Numbering and names have one home, the `[results]` section of the config
(`dicom_node.config.ResultsConfig`): the SR series takes `series_number` and
`series_description`, the heatmap and summary SCs the next number and "<description> - heatmaps",
the KOS (only with `send_kos`) the number after that and "<description> - key images".
`ResultOptions()` is exactly what a node with the default configuration builds.

A study called PE absent gets no heatmap SCs unless `heatmaps_for_negative` (`[results]
heatmaps_for_negative`); when it gets them, their captions say "below threshold: not a finding".
The SR, the summary SC and the KOS are built either way.

Weak labels (validation AUROC below the bundle's floor, `dicom_node.model.bundle.LabelValidation`)
are read from `bundle_info` and marked on the heatmap and summary SCs; `omit_weak_labels`
(`[results] omit_weak_labels`) is the SR's choice to leave their measurement groups out (default:
report them, marked not validated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from dicom_node.config import ResultsConfig
from dicom_node.labels import WINDOW_LABEL
from dicom_node.model.bundle import LabelValidation, label_validation_of

if TYPE_CHECKING:
    from dicom_node.imaging.preprocess import Windows
    from dicom_node.imaging.series import CtSeries
    from dicom_node.model.inference import Prediction
    from dicom_node.results.key_slices import KeySlice

__all__ = ["ResultOptions", "ResultSet", "build_results"]

_DEFAULT = ResultsConfig()


def _sc_description(series_description: str) -> str:
    return f"{series_description} - heatmaps"


def _kos_description(series_description: str) -> str:
    return f"{series_description} - key images"


@dataclass(frozen=True)
class ResultOptions:
    """What to build and how the result series are numbered and named (defaults: the default `[results]`)."""

    key_slices: int = _DEFAULT.top_k_heatmaps
    revision: int = 0
    sr_series_number: int = _DEFAULT.series_number
    sr_series_description: str = _DEFAULT.series_description
    sc_series_number: int = _DEFAULT.series_number + 1
    sc_series_description: str = _sc_description(_DEFAULT.series_description)
    kos: bool = _DEFAULT.send_kos
    kos_series_number: int = _DEFAULT.series_number + 2
    kos_series_description: str = _kos_description(_DEFAULT.series_description)
    kos_title: str = "of_interest"
    hot_fraction: float = 0.5
    summary: bool = True
    institution_name: str | None = None
    heatmaps_for_negative: bool = _DEFAULT.heatmaps_for_negative
    omit_weak_labels: bool = _DEFAULT.omit_weak_labels

    def __post_init__(self) -> None:
        if self.key_slices < 1:
            raise ValueError(f"ResultOptions: key_slices={self.key_slices}; expected >= 1")
        if self.revision < 0:
            raise ValueError(f"ResultOptions: revision={self.revision}; expected >= 0")
        if not 0.0 <= self.hot_fraction < 1.0:
            raise ValueError(f"ResultOptions: hot_fraction={self.hot_fraction}; expected 0 <= hot_fraction < 1")

    @classmethod
    def from_config(cls, results: ResultsConfig, *, revision: int = 0) -> ResultOptions:
        """The options a node with this `[results]` section builds for result revision `revision` (0-based)."""
        return cls(
            key_slices=results.top_k_heatmaps,
            revision=revision,
            sr_series_number=results.series_number,
            sr_series_description=results.series_description,
            sc_series_number=results.series_number + 1,
            sc_series_description=_sc_description(results.series_description),
            kos=results.send_kos,
            kos_series_number=results.series_number + 2,
            kos_series_description=_kos_description(results.series_description),
            heatmaps_for_negative=results.heatmaps_for_negative,
            omit_weak_labels=results.omit_weak_labels,
        )


@dataclass(frozen=True)
class ResultSet:
    """The objects to send back into the study, and their UIDs.

    `validation`: the bundle's weak labels (None weak list = unknown), as marked on the SCs.
    """

    sr: Dataset
    heatmap_scs: tuple[Dataset, ...]
    summary_sc: Dataset | None
    kos: Dataset | None
    key_slices: tuple[KeySlice, ...]
    validation: LabelValidation = LabelValidation()
    prediction: Prediction | None = field(default=None, compare=False)  # what the objects report (worklist priority)

    @property
    def weak_labels(self) -> tuple[str, ...] | None:
        """Labels the bundle marks weak (validation AUROC below its floor); None = unknown."""
        return self.validation.weak

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


def build_results(series: CtSeries, windows: Windows, prediction: Prediction, bundle_info: Any = None,
                  options: ResultOptions = ResultOptions(), *, predecessor: Dataset | None = None) -> ResultSet:
    """SR + heatmap SCs + summary SC + optional KOS for one series (see module docstring).

    Parameters
    ----------
    bundle_info
        The bundle's manifest (a `BundleManifest`, a dict, or a `BundleInfo`); None takes the model
        name, version and UID from the prediction.
    predecessor
        The previous revision's SR (or `dicom_node.results.sr.predecessor_reference`); required
        when `options.revision > 0`.
    """
    from dicom_node.results.key_slices import select_key_slices
    from dicom_node.results.kos import build_kos
    from dicom_node.results.sc import build_heatmap_sc, build_summary_sc
    from dicom_node.results.sr import BundleInfo, build_sr, device_observer_context
    from dicom_node.results.uids import result_uid

    bundle = BundleInfo.from_prediction(prediction) if bundle_info is None else BundleInfo.from_manifest(bundle_info)
    validation = label_validation_of(bundle_info)  # weak labels; the SR's use of them: docs/results.md
    src, model, rev = series.series_instance_uid, bundle.model_uid, options.revision
    keys = select_key_slices(series, windows, prediction, k=options.key_slices)
    positive = bool(prediction.labels.get(WINDOW_LABEL))
    sr = build_sr(series, windows, prediction, bundle_manifest_info=bundle, key_slices=keys,
                  series_number=options.sr_series_number, series_description=options.sr_series_description,
                  revision=rev, predecessor=predecessor, institution_name=options.institution_name,
                  validation=validation, omit_weak_labels=options.omit_weak_labels)
    sc_series = result_uid("sc-series", src, model, rev)
    scs = tuple(
        build_heatmap_sc(series, ks, probability=ks.window_probability,
                         series_instance_uid=sc_series, sop_instance_uid=result_uid("sc", src, model, rev, ks.rank),
                         series_number=options.sc_series_number, instance_number=ks.rank + 1,
                         manufacturer=bundle.manufacturer, hot_fraction=options.hot_fraction,
                         series_description=options.sc_series_description,
                         threshold=float(prediction.thresholds[WINDOW_LABEL]), study_positive=positive,
                         validation=validation)
        for ks in keys
        if positive or options.heatmaps_for_negative  # a study called PE absent: no heatmaps unless asked for
    )
    summary = None
    if options.summary:
        summary = build_summary_sc(series, prediction, series_instance_uid=sc_series,
                                   sop_instance_uid=result_uid("sc-summary", src, model, rev),
                                   series_number=options.sc_series_number, instance_number=len(scs) + 1,
                                   manufacturer=bundle.manufacturer, reference_z=keys[0].z,
                                   series_description=options.sc_series_description, validation=validation)
    kos = None
    if options.kos:
        kos = build_kos(series, keys, series_instance_uid=result_uid("kos-series", src, model, rev),
                        sop_instance_uid=result_uid("kos", src, model, rev),
                        series_number=options.kos_series_number, manufacturer=bundle.manufacturer,
                        title=options.kos_title, observer_device_context=device_observer_context(bundle),
                        series_description=options.kos_series_description)
    result = ResultSet(sr=sr, heatmap_scs=scs, summary_sc=summary, kos=kos, key_slices=keys, validation=validation,
                       prediction=prediction)
    return result
