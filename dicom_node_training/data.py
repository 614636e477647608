"""RSNA-layout data for training: labels, the study split, the preprocessed cache, torch datasets.

Layout read (the RSNA-STR Pulmonary Embolism challenge's, also written by `dicom_node_phantoms.dataset`)::

    DATA/train.csv                                   one row per slice (CSV_COLUMNS)
    DATA/train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Everything the run derives lives under RUN::

    RUN/split.json                 study-level train/validation/test split (seeded)
    RUN/cache/<study>.npy          windows at resize size, uint8 (N, 3, 10, R, R) = round(255 * x); for the
                                   Shi family the 50 slabs (50, 1, 5, R, R), labelled by their central slice
    RUN/cache/<study>.json         window labels, study labels, shape, preprocessing config
    RUN/cache/<study>.mask.npz     when DATA/masks/<study>.npz exists: the embolus mask in model space
                                   (`dicom_node.imaging.preprocess.mask_to_windows`) of the windows that
                                   hold any of it, and which windows have a known mask (attention loss)

Masks (optional, for ``phase1.attention_loss_weight``): ``DATA/masks/<StudyInstanceUID>.npz`` with
``mask`` (Z, Y, X) bool and ``sop_uids`` (Z,) naming each mask slice (the phantoms write both); an
optional ``annotated`` (Z,) bool marks the slices that were annotated at all (sparse annotation,
e.g. every 10 mm as in Shi et al. 2020): windows covering no annotated slice have no known mask.

The cache is built once (process pool, tqdm bar) with the node's own preprocessing
(`dicom_node.imaging.series.load_series` + `dicom_node.imaging.preprocess.prepare`), so the model trains on
exactly what the node will feed it, and no epoch decodes DICOM again. uint8 keeps 1/255 of each
HU window (5.9 HU of the lung window, 2.7 HU of the PE window, 1.6 HU of the mediastinal one).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Collection, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL
from dicom_node.log import get_logger
from dicom_node.model.sequence import SEQUENCE_LENGTH, to_fixed_length

if TYPE_CHECKING:
    from dicom_node.imaging.preprocess import PreprocessConfig

__all__ = [
    "PAPER_SPLIT",
    "DataError",
    "check_rsna_data",
    "cache_stamp",
    "StudyRecord",
    "Split",
    "CacheEntry",
    "read_rsna_labels",
    "make_split",
    "save_split",
    "load_split",
    "build_cache",
    "write_cache_entry",
    "load_cache_index",
    "WindowDataset",
    "SequenceDataset",
    "seed_worker",
]

log = get_logger("dicom_node_training.data")

#: Train / validation / test studies of Ma et al. 2022 (proportions used for any dataset size).
PAPER_SPLIT: tuple[int, int, int] = (5292, 1000, 1000)
SPLITS: tuple[str, ...] = ("train", "validation", "test")


# --------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class StudyRecord:
    """One study of train.csv: its series, the slice labels and the nine study labels."""

    study_uid: str
    series_uid: str
    slice_labels: tuple[tuple[str, int], ...]  # (SOPInstanceUID, pe_present_on_image)
    study_labels: tuple[int, ...]  # in STUDY_LABELS order

    @property
    def positive(self) -> bool:
        return any(v for _, v in self.slice_labels)

    def slice_label_map(self) -> dict[str, int]:
        return dict(self.slice_labels)


class DataError(ValueError):
    """The RSNA-layout data folder is missing or malformed; the message names the file and the fix."""


_LAYOUT = "expected the RSNA layout DATA/train.csv + DATA/train/<study>/<series>/<sop>.dcm"


def read_rsna_labels(data_dir: str | os.PathLike[str]) -> dict[str, StudyRecord]:
    """Read DATA/train.csv into one `StudyRecord` per study (sorted by study UID).

    Raises `DataError` (one line: the file, what is wrong, what was expected) when the folder or
    train.csv is missing or unreadable, a column is missing, a label is not a number, or there
    are no rows."""
    data = Path(data_dir)
    if not data.is_dir():
        raise DataError(f"{data}: no such data folder; {_LAYOUT} (`dicom-node-train phantom --out DIR` writes one)")
    path = data / "train.csv"
    if not path.is_file():
        raise DataError(f"{path}: no train.csv; {_LAYOUT}")
    required = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "pe_present_on_image", *STUDY_LABELS)
    rows: dict[str, dict[str, Any]] = {}  # series: [str], slices: [(sop, label)], labels: tuple | None
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = set(required) - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: missing columns {sorted(missing)}; expected the RSNA-STR train.csv columns")
            for r in reader:
                try:
                    label = int(float(r["pe_present_on_image"]))
                    labels = tuple(int(float(r[k])) for k in STUDY_LABELS)
                except (TypeError, ValueError):
                    bad = next(k for k in ("pe_present_on_image", *STUDY_LABELS) if not _is_number(r[k]))
                    raise DataError(f"{path} line {reader.line_num}: {bad} = {r[bad]!r} is not a number; "
                                    "expected 0 or 1 in every label column") from None
                if not all(r[k] for k in required[:3]):
                    raise DataError(f"{path} line {reader.line_num}: empty StudyInstanceUID, SeriesInstanceUID or "
                                    "SOPInstanceUID; expected one row per slice with its UIDs")
                study = rows.setdefault(r["StudyInstanceUID"], {"series": [], "slices": [], "labels": None})
                study["series"].append(r["SeriesInstanceUID"])
                study["slices"].append((r["SOPInstanceUID"], label))
                if study["labels"] is None:
                    study["labels"] = labels
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e}); {_LAYOUT}") from None
    out: dict[str, StudyRecord] = {}
    for uid in sorted(rows):
        s = rows[uid]
        series = max(set(s["series"]), key=s["series"].count)  # RSNA: one series per study
        slices = tuple(sl for sl, se in zip(s["slices"], s["series"]) if se == series)
        out[uid] = StudyRecord(uid, series, slices, s["labels"])
    if not out:
        raise DataError(f"{path}: no rows, so no study; expected one row per slice")
    return out


def _is_number(v: str | None) -> bool:
    try:
        float(v or "empty")
    except (TypeError, ValueError):
        return False
    return True


def check_rsna_data(data_dir: str | os.PathLike[str] | None) -> dict[str, StudyRecord]:
    """The checks the cache step makes before it writes anything: `read_rsna_labels` plus DATA/train/.

    Returns the records; raises `DataError` (one line) for a missing --data, folder, file, column
    or study."""
    if data_dir is None:
        raise DataError(f"the cache step needs --data DIR; {_LAYOUT}")
    records = read_rsna_labels(data_dir)
    images = Path(data_dir) / "train"
    if not images.is_dir():
        raise DataError(f"{images}: no such folder, so no DICOM for the {len(records)} studies of train.csv; {_LAYOUT}")
    return records


# ---------------------------------------------------------------------------------------- split
@dataclass(frozen=True)
class Split:
    """Study UIDs per split; no study is in two splits."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in SPLITS:
            raise KeyError(f"split {name!r}: expected one of {SPLITS}")
        return getattr(self, name)


def make_split(records: dict[str, StudyRecord], seed: int, proportions: tuple[float, float, float] = PAPER_SPLIT) -> Split:
    """Seeded study-level split in `proportions`, stratified by PE-positive / negative.

    Each class is split on its own, so validation and test hold both classes whenever a class
    has at least three studies (then each split gets at least one of it).
    """
    rng = np.random.default_rng(seed)
    total = float(sum(proportions))
    parts: dict[str, list[str]] = {k: [] for k in SPLITS}
    for positive in (False, True):
        uids = sorted(u for u, r in records.items() if r.positive == positive)
        uids = [uids[i] for i in rng.permutation(len(uids))]
        n = len(uids)
        n_val = int(round(n * proportions[1] / total))
        n_test = int(round(n * proportions[2] / total))
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        elif n == 2:
            n_val, n_test = 1, 0
        else:
            n_val, n_test = 0, 0
        n_train = n - n_val - n_test
        parts["train"] += uids[:n_train]
        parts["validation"] += uids[n_train:n_train + n_val]
        parts["test"] += uids[n_train + n_val:]
    train, validation, test = (tuple(sorted(parts[k])) for k in SPLITS)
    return Split(train, validation, test, seed=seed)


def save_split(split: Split, path: str | os.PathLike[str]) -> None:
    data = {k: list(split[k]) for k in SPLITS} | {"seed": split.seed}
    _write_json_atomic(Path(path), data)


def load_split(path: str | os.PathLike[str]) -> Split:
    data = json.loads(Path(path).read_text())
    train, validation, test = (tuple(data[k]) for k in SPLITS)
    return Split(train, validation, test, seed=int(data["seed"]))


# ---------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CacheEntry:
    """One cached study: where its windows are and their labels."""

    study_uid: str
    series_uid: str
    array_path: Path
    n_windows: int
    window_labels: np.ndarray  # (N,) int
    study_labels: np.ndarray  # (9,) float32 in STUDY_LABELS order
    resize: int
    #: RUN/cache/<study>.mask.npz, or None when the study has no mask
    mask_path: Path | None = None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _cache_one(data_dir: str, cache_dir: str, record: StudyRecord, pp_config: PreprocessConfig) -> tuple[str, str | None, int, float]:
    """Worker: DICOM -> windows -> RUN/cache/<study>.npy + .json. Returns (uid, error, bytes, seconds)."""
    from dicom_node.imaging.preprocess import prepare
    from dicom_node.imaging.series import load_series

    t0 = time.perf_counter()
    uid = record.study_uid
    try:
        series = load_series(Path(data_dir) / "train" / uid / record.series_uid)
        windows = prepare(series, pp_config, slice_labels=record.slice_label_map())
        mask_file = Path(data_dir) / "masks" / f"{uid}.npz"
        masks = _window_masks(mask_file, series, windows, pp_config) if mask_file.is_file() else None
    except Exception as exc:  # one bad study must not stop the cache; it is reported and skipped
        return uid, f"{type(exc).__name__}: {exc}", 0, time.perf_counter() - t0
    arr = np.clip(np.rint(np.asarray(windows.array, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    labels = np.zeros(arr.shape[0], dtype=np.int64) if windows.labels is None else np.asarray(windows.labels, dtype=np.int64)
    write_cache_entry(Path(cache_dir), uid, record.series_uid, arr, labels, record.study_labels, cache_stamp(pp_config),
                      masks=masks)
    return uid, None, int(arr.nbytes), time.perf_counter() - t0


def _window_masks(path: Path, series: Any, windows: Any, pp_config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """DATA/masks/<study>.npz -> ((N, D, R, R) bool model-space mask, (N,) bool mask known per window)."""
    from dicom_node.imaging.preprocess import mask_to_windows

    with np.load(path) as f:
        mask, sop_uids = f["mask"], [str(u) for u in f["sop_uids"]]
        annotated = f["annotated"].astype(bool) if "annotated" in f.files else np.ones(len(sop_uids), dtype=bool)
    where = {u: i for i, u in enumerate(sop_uids)}
    missing = [u for u in series.sop_instance_uids if u not in where]
    if missing or mask.shape != series.hu.shape:
        raise DataError(f"{path}: mask of shape {mask.shape} naming {len(sop_uids)} slices does not cover the series' "
                        f"{len(series.sop_instance_uids)} slices of {tuple(series.hu.shape[1:])} (e.g. {missing[:1]} missing); "
                        "write one mask slice per SOP Instance UID (`sop_uids`), or remove the file")
    order = [where[u] for u in series.sop_instance_uids]  # mask slices in the series' sorted order
    model_mask = mask_to_windows(series, mask[order], windows.geometry, pp_config)
    if windows.geometry.z_resize:  # slabs (Shi et al.): a slab's mask is known when its central slice was annotated
        from dicom_node.imaging.preprocess import slab_centre_slices

        return model_mask, annotated[np.asarray(order)[slab_centre_slices(windows.geometry)]]
    known = np.array([bool(annotated[[order[i] for i in idx]].any()) if idx else False
                      for idx in windows.slice_indices], dtype=bool)
    return model_mask, known


def write_cache_entry(cache_dir: Path, study_uid: str, series_uid: str, windows: np.ndarray, window_labels: Iterable[Any],
                      study_labels: Iterable[Any], preprocess: dict[str, Any],
                      masks: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """One study of the cache: `<study>.npy` (N, 3, D, R, R) uint8 windows and `<study>.json` (UIDs, shape,
    labels, the preprocessing it was made with), each written atomically, the .json last: its presence
    marks the study done; with `masks` ((N, D, R, R) bool, (N,) bool known) also `<study>.mask.npz`.
    The one writer of the format `load_cache_index` reads."""
    tmp = cache_dir / f"{study_uid}.tmp.npy"
    np.save(tmp, windows)
    os.replace(tmp, cache_dir / f"{study_uid}.npy")
    if masks is not None:
        mask, known = masks
        hot = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
        tmp_mask = cache_dir / f"{study_uid}.mask.tmp.npz"
        np.savez_compressed(tmp_mask, windows=hot, mask=mask[hot], known=known, shape=np.array(mask.shape))
        os.replace(tmp_mask, cache_dir / f"{study_uid}.mask.npz")
    meta = {
        "study_uid": study_uid,
        "series_uid": series_uid,
        "shape": list(windows.shape),
        "window_labels": [int(v) for v in window_labels],
        "study_labels": [float(v) for v in study_labels],
        "preprocess": preprocess,
        "mask": masks is not None,
    }
    _write_json_atomic(cache_dir / f"{study_uid}.json", meta)


def cache_stamp(pp_config: PreprocessConfig) -> dict[str, Any]:
    """The cache's preprocessing stamp: `PreprocessConfig.to_dict`, as read back from JSON (the form it
    is compared in)."""
    return cast(dict[str, Any], json.loads(json.dumps(pp_config.to_dict())))


def build_cache(data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], records: dict[str, StudyRecord],
                pp_config: PreprocessConfig, *, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Preprocess every study once into RUN/cache (skipping studies already cached).

    Returns a summary dict (studies done/failed, bytes per study); failures are logged with the
    study UID and the reason, written to RUN/cache/failed.json, and left out of training.
    """
    from tqdm import tqdm

    cache = Path(run_dir) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    want = cache_stamp(pp_config)
    todo = []
    for uid, rec in records.items():
        meta_path = cache / f"{uid}.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta["preprocess"] != want:
                raise ValueError(
                    f"{meta_path}: cached with preprocessing {meta['preprocess']}, the run asks for {want}; "
                    f"delete {cache} (or use a new --out) to rebuild the cache")
            continue
        todo.append(rec)
    failed: dict[str, str] = {}
    sizes: list[int] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="cache", unit="study", disable=not progress)
    if workers and workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_cache_one, str(data_dir), str(cache), rec, pp_config) for rec in todo]
            for fut in as_completed(futures):
                _record_result(fut.result(), failed, sizes)
                bar.update(1)
    else:
        for rec in todo:
            _record_result(_cache_one(str(data_dir), str(cache), rec, pp_config), failed, sizes)
            bar.update(1)
    bar.close()
    old_failed = json.loads((cache / "failed.json").read_text()) if (cache / "failed.json").is_file() else {}
    old_failed.update(failed)
    _write_json_atomic(cache / "failed.json", old_failed)
    summary = {
        "studies_cached": len(todo) - len(failed),
        "studies_failed": len(failed),
        "studies_already_cached": len(records) - len(todo),
        "mean_bytes_per_study": float(np.mean(sizes)) if sizes else 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("cache_built", **summary)
    return summary


def _record_result(result: tuple[str, str | None, int, float], failed: dict[str, str], sizes: list[int]) -> None:
    uid, error, nbytes, seconds = result
    if error:
        failed[uid] = error
        log.warning("study_not_cached", study_uid=uid, error=error)
    else:
        sizes.append(nbytes)
        log.debug("study_cached", study_uid=uid, bytes=nbytes, seconds=round(seconds, 2))


def load_cache_index(run_dir: str | os.PathLike[str], study_uids: Collection[str] | None = None) -> dict[str, CacheEntry]:
    """Cached studies (optionally only `study_uids`; those not cached are skipped with a warning)."""
    cache = Path(run_dir) / "cache"
    metas = sorted(cache.glob("*.json"))
    out: dict[str, CacheEntry] = {}
    for p in metas:
        if p.name in ("failed.json", "done.json"):
            continue
        m = json.loads(p.read_text())
        out[m["study_uid"]] = CacheEntry(
            study_uid=m["study_uid"], series_uid=m["series_uid"], array_path=cache / f"{m['study_uid']}.npy",
            n_windows=int(m["shape"][0]), window_labels=np.asarray(m["window_labels"], dtype=np.int64),
            study_labels=np.asarray(m["study_labels"], dtype=np.float32), resize=int(m["shape"][-1]),
            mask_path=cache / f"{m['study_uid']}.mask.npz" if m.get("mask") else None)
    if study_uids is None:
        return out
    missing = [u for u in study_uids if u not in out]
    if missing:
        log.warning("studies_not_in_cache", count=len(missing), first=missing[:3])
    return {u: out[u] for u in study_uids if u in out}


# -------------------------------------------------------------------------------------- phase 1
def rotate_and_crop(x: torch.Tensor, crop: int, angle_deg: float, offset: tuple[int, int]) -> torch.Tensor:
    """(C, D, R, R) -> (C, D, crop, crop): in-plane rotation about the image centre, then a crop."""
    c, d, h, w = x.shape
    if angle_deg:
        a = math.radians(angle_deg)
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
        planes = x.reshape(1, c * d, h, w)
        grid = F.affine_grid(theta[None], list(planes.shape), align_corners=False)
        x = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(c, d, h, w)
    r, q = offset
    return x[:, :, r:r + crop, q:q + crop]


class WindowDataset(Dataset):
    """Phase 1: one item = one 10-slice window (3, 10, crop, crop) float32 and its label (and, with
    `study_labels=True`, its study's nine labels (9,) float32, for `phase1.study_label_weight`; then,
    with `masks=True`, the window's embolus mask (10, crop, crop) float32 0/1, rotated and cropped with
    the window, and 1.0 / 0.0 for whether the mask is known, for `phase1.attention_loss_weight`).

    Training (`augment=True`): random in-plane rotation within +-`max_rotation_deg` and a random
    `crop` x `crop` crop of the resize x resize window. Evaluation: the centre crop, as the node's
    `preprocess` does. Randomness comes from (seed, epoch, index) only, so it does not depend on
    the number of workers or processes; call `set_epoch` before each epoch.
    """

    def __init__(self, entries: dict[str, CacheEntry], crop: int, *, augment: bool, seed: int = 0,
                 max_rotation_deg: float = 15.0, random_crop: bool = True, study_labels: bool = False,
                 masks: bool = False):
        self.entries = entries
        self.study_labels = study_labels  # items are (x, label, the study's nine labels) when True
        self.masks = masks  # ... then (mask, mask known) when True
        #: study -> ((N,) bool mask known per window, {window: (D, R, R) bool mask of the windows holding any})
        self._masks: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        if masks:
            for uid, e in entries.items():
                if e.mask_path is not None:
                    with np.load(e.mask_path) as f:
                        self._masks[uid] = (f["known"].astype(bool), {int(w): m for w, m in zip(f["windows"], f["mask"])})
        self.crop = int(crop)
        self.augment = augment
        self.random_crop = random_crop
        self.seed = int(seed)
        self.max_rotation_deg = float(max_rotation_deg)
        self.epoch = 0
        self.index = [(u, w) for u in sorted(entries) for w in range(entries[u].n_windows)]
        self.labels = np.array([entries[u].window_labels[w] for u, w in self.index], dtype=np.float32)
        #: each window's height in its study, 0 (first window) .. 1 (last), for level-matched sampling
        self.levels = np.array([(w + 0.5) / entries[u].n_windows for u, w in self.index], dtype=np.float32)
        self._arrays: dict[str, np.ndarray] = {}
        for e in entries.values():
            if e.resize < self.crop:
                raise ValueError(f"study {e.study_uid}: cached windows are {e.resize} px, smaller than crop {self.crop}; rebuild the cache with resize >= crop")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def _array(self, uid: str) -> np.ndarray:
        arr = self._arrays.get(uid)
        if arr is None:
            arr = self._arrays[uid] = np.load(self.entries[uid].array_path, mmap_mode="r")
        return arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        uid, w = self.index[i]
        x = torch.from_numpy(np.asarray(self._array(uid)[w], dtype=np.float32) / 255.0)
        size = x.shape[-1]
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            angle = float(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)) if self.max_rotation_deg else 0.0
            offset = (int(rng.integers(0, size - self.crop + 1)), int(rng.integers(0, size - self.crop + 1)))
        if not self.augment:
            angle = 0.0
        if not (self.augment and self.random_crop):
            o = (size - self.crop) // 2
            offset = (o, o)
        x = rotate_and_crop(x, self.crop, angle, offset).contiguous()
        item: tuple[torch.Tensor, ...] = (x, torch.tensor(self.labels[i]))
        if self.study_labels:
            item += (torch.from_numpy(self.entries[uid].study_labels.astype(np.float32)),)
        if self.masks:
            item += self._mask_item(uid, w, angle, offset)
        return item

    @property
    def studies_with_masks(self) -> int:
        """How many studies have a mask (only counted with `masks=True`)."""
        return len(self._masks)

    def _mask_item(self, uid: str, w: int, angle: float, offset: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        known, hot = self._masks.get(uid, (None, {}))
        if w not in hot:
            depth = int(self._array(uid).shape[2])
            return torch.zeros((depth, self.crop, self.crop)), torch.tensor(float(known is not None and known[w]))
        m = torch.from_numpy(hot[w].astype(np.float32))[None]  # (1, D, R, R): one "channel", moved with the window
        # a thin clot must survive the bilinear rotation: keep every pixel it reaches by a quarter
        m = rotate_and_crop(m, self.crop, angle, offset)[0] > 0.25
        return m.float().contiguous(), torch.tensor(float(known is not None and known[w]))


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy/random seeds from torch's per-worker seed."""
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# -------------------------------------------------------------------------------------- phase 2
class SequenceDataset(Dataset):
    """Phase 2: one item = one study's feature sequence at the fixed length 40.

    Reads RUN/features/<study>.npy (N, F). Returns a dict of tensors: `features` (L, F), `mask`
    (L,), `window_labels` (L,) (resized the same way as the features: soft targets when N > L),
    `study_labels` (9,), `n_windows` (), `q` () = the study's share of positive windows.
    """

    def __init__(self, features_dir: str | os.PathLike[str], entries: dict[str, CacheEntry], length: int = SEQUENCE_LENGTH) -> None:
        self.features_dir = Path(features_dir)
        self.entries = entries
        self.uids = sorted(entries)
        self.length = int(length)

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        uid = self.uids[i]
        e = self.entries[uid]
        feats = np.load(self.features_dir / f"{uid}.npy")
        if feats.shape[0] != e.n_windows:
            raise ValueError(f"study {uid}: {feats.shape[0]} feature rows but {e.n_windows} cached windows; rerun `features`")
        fx = to_fixed_length(feats, self.length)
        lab = to_fixed_length(e.window_labels.astype(np.float32), self.length)
        return {
            "features": torch.from_numpy(fx.x),
            "mask": torch.from_numpy(fx.mask),
            "window_labels": torch.from_numpy(lab.x),
            "study_labels": torch.from_numpy(e.study_labels),
            "n_windows": torch.tensor(e.n_windows),
            "q": torch.tensor(float(e.window_labels.mean()), dtype=torch.float32),
        }


LABEL_NAMES = (WINDOW_LABEL, *STUDY_LABELS)
