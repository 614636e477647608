"""Synthetic CT pulmonary angiograms with exact ground truth, in the RSNA-STR PE layout.

numpy + scipy + pydicom only (no torch). One seed gives one study, always the same:

    study = generate_study(7, PhantomConfig(rows=128, cols=128, n_slices=140, slice_thickness_mm=2.5))
    study.hu            # (Z, Y, X) int16 HU, z increasing along the slice normal (feet -> head)
    study.embolus_mask  # (Z, Y, X) bool
    study.slice_labels  # (Z,) pe_present_on_image
    study.study_labels  # every RSNA study column incl. QA flags
    write_study(study, Path("out/train"))   # dicom_node_phantoms.dicom

"Always the same" is bit for bit: pixel data, UIDs and every element, for as long as the seed
and the config are the same. The study draws every random number from one generator seeded with
`seed`, in a fixed order (case kind, contrast, anatomy in `dicom_node_phantoms.anatomy`, mimic, emboli,
noise, position, patient), so any change to the order or count of draws changes every study
after it; keep new draws at the end, or on a generator of their own.

Label semantics follow the RSNA-STR challenge: `central_pe` when an embolus sits in the main,
left or right pulmonary artery; `leftsided_pe`/`rightsided_pe` when one sits on that side (the
left/right PA trunk counts for its side as well as central). Geometry and identity live in
`dicom_node_phantoms.geometry`, the DICOM files in `dicom_node_phantoms.dicom`, test variants in `dicom_node_phantoms.variants`
and the RSNA-style data set (`train/`, `train.csv`, `masks/`) in `dicom_node_phantoms.dataset`.
"""

from __future__ import annotations

import numpy as np

from dicom_node.labels import QA_COLUMNS, STUDY_LABELS
from dicom_node_phantoms.anatomy import (
    CENTRAL_KINDS,
    Canvas,
    Embolus,
    build_anatomy,
    paint_emboli,
    paint_mimic,
    place_emboli,
)
from dicom_node_phantoms.geometry import (
    DEFAULT_CONFIG,
    HU_INTERCEPT,
    PhantomConfig,
    PhantomStudy,
    draw_pixel_spacing,
    phantom_study_uid,
    phantom_uid,
)

__all__ = ["generate_study"]


def _noise_bank(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """A few slices of in-plane correlated, unit-variance noise (CT noise texture), cut randomly per slice."""
    from scipy.ndimage import gaussian_filter

    white = rng.standard_normal((n, h, w), dtype=np.float32)
    smooth = gaussian_filter(white, sigma=(0, 0.9, 0.9))
    bank = 0.45 * white + smooth / smooth.std()
    return bank / bank.std()


def generate_study(seed: int, config: PhantomConfig = DEFAULT_CONFIG, *, kind: str | None = None) -> PhantomStudy:
    """Generate one CTPA study; the same `seed` and `config` always give the same study.

    `kind` (positive | negative | indeterminate) overrides the draw from `config.prevalence`;
    `generate_dataset` uses it to hit the configured case mix exactly.
    """
    from scipy.ndimage import gaussian_filter1d

    seed = int(seed)
    rng = np.random.default_rng(seed)
    ps = draw_pixel_spacing(rng, config)
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

    shown: list[Embolus] = []
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
        slice_labels=np.asarray(mask.any(axis=(1, 2)), dtype=np.int64),
        study_labels=labels,
        kind=kind,
        pixel_spacing_mm=(ps, ps),
        slice_thickness_mm=dz,
        spacing_between_slices_mm=dz,
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        positions=positions,
        study_uid=phantom_study_uid(seed),
        series_uid=phantom_uid(seed, "series", 1),
        frame_of_reference_uid=phantom_uid(seed, "frame"),
        sop_uids=tuple(phantom_uid(seed, "sop", 1, k) for k in range(Z)),
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
