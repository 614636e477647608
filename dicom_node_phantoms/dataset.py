"""The RSNA-STR PE layout data set of phantom studies: `train/`, `train.csv`, `masks/`.

    generate_dataset(Path("out"), n_studies=20, seed=1, config=PhantomConfig(rows=128, cols=128))
    # out/train/<StudyUID>/<SeriesUID>/<SOPUID>.dcm, out/train.csv, out/masks/<StudyUID>.npz

A data set is a function of (n_studies, seed, config): `dataset_plan` gives each study's seed
and kind without writing anything, so a reader can regenerate any one study from its plan entry
(`generate_study(seed, config, kind=kind)`) instead of reading its files. `train.csv` has the
challenge's columns (`dicom_node.labels.CSV_COLUMNS`), one row per slice, in slice order.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np

from dicom_node.labels import CSV_COLUMNS
from dicom_node_phantoms.dicom import write_study
from dicom_node_phantoms.geometry import DEFAULT_CONFIG, PhantomConfig, PhantomStudy
from dicom_node_phantoms.study import generate_study

__all__ = ["csv_rows", "dataset_plan", "generate_dataset", "study_seed"]


def study_seed(dataset_seed: int, index: int) -> int:
    """Seed of study `index` of a data set generated with `dataset_seed` (stable across runs)."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1, dtype=np.uint32)[0])


def csv_rows(study: PhantomStudy) -> list[dict[str, str | int]]:
    """The study's `train.csv` rows (one per slice, in slice order)."""
    rows = []
    for k, sop in enumerate(study.sop_uids):
        row: dict[str, str | int] = {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": study.series_uid,
                                     "SOPInstanceUID": sop, "pe_present_on_image": int(study.slice_labels[k])}
        row.update({c: int(study.study_labels[c]) for c in CSV_COLUMNS if c in study.study_labels})
        rows.append({c: row[c] for c in CSV_COLUMNS})
    return rows


def _write_one(args: tuple[int, PhantomConfig, Path, str]) -> tuple[list[dict[str, str | int]], int, int]:
    """One study of a data set: its DICOM files and mask written, its csv rows, file count and positivity returned.

    A module-level function of one tuple, so that `ProcessPoolExecutor.map` can pickle it."""
    seed, config, out, kind = args
    study = generate_study(seed, config, kind=kind)
    paths = write_study(study, out / "train")
    np.savez_compressed(out / "masks" / f"{study.study_uid}.npz", mask=study.embolus_mask,
                        sop_uids=np.array(study.sop_uids), slice_labels=study.slice_labels)
    return csv_rows(study), len(paths), int(study.is_positive)


def dataset_plan(n_studies: int, seed: int, config: PhantomConfig = DEFAULT_CONFIG) -> list[tuple[int, str]]:
    """(study seed, kind) of each study `generate_dataset(out, n_studies, seed, config)` writes, in order:
    an exact case mix (round(n * prevalence) positives, round(n * indeterminate_share) indeterminate)
    in a seeded order. `generate_study(seed, config, kind=kind)` gives the study back."""
    n_pos = int(round(n_studies * config.prevalence))
    n_ind = min(int(round(n_studies * config.indeterminate_share)), n_studies - n_pos)
    kinds = ["positive"] * n_pos + ["indeterminate"] * n_ind + ["negative"] * (n_studies - n_pos - n_ind)
    np.random.default_rng(np.random.SeedSequence([seed, 7919])).shuffle(kinds)
    return [(study_seed(seed, i), kinds[i]) for i in range(n_studies)]


def generate_dataset(out: Path, n_studies: int, seed: int, config: PhantomConfig = DEFAULT_CONFIG,
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
    results: list[tuple[list[dict[str, str | int]], int, int]] = []
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
