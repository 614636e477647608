"""Anatomy and emboli of the synthetic CTPA phantom (numpy + scipy only, no torch).

Everything is built in patient millimetres (LPS: +x patient left, +y posterior, +z superior) on a
(Z, Y, X) voxel grid and drawn on bounding boxes only: large structures as per-slice ellipses,
vessels and emboli as chains of tapered capsules whose occupancy (0..1, a one-voxel partial-volume
ramp) is computed from the distance to the centreline. `dicom_node_phantoms.study` turns the result into
labelled studies, `dicom_node_phantoms.dicom` into DICOM files.

`build_anatomy` calls one function per structure (`draw_body`, `draw_lungs`, `draw_heart`,
`draw_aorta`, `pulmonary_artery_tree`, `draw_lung_vessels`, `draw_pulmonary_arteries`,
`draw_spine`, `draw_sternum`, `draw_ribs`), in that order, each drawing from the one generator of
the study: a study is the sequence of those draws, so reordering the calls or the draws inside
them changes every phantom (the tests' and the benchmarks' fingerprints with them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

__all__ = [
    "Tissue",
    "Vessel",
    "Embolus",
    "Canvas",
    "Anatomy",
    "Body",
    "Heart",
    "Box",
    "LungShape",
    "CENTRAL_KINDS",
    "VESSEL_KINDS",
    "build_anatomy",
    "draw_body",
    "draw_lungs",
    "draw_heart",
    "draw_aorta",
    "pulmonary_artery_tree",
    "draw_lung_vessels",
    "draw_pulmonary_arteries",
    "draw_spine",
    "draw_sternum",
    "draw_ribs",
    "place_emboli",
    "paint_emboli",
    "paint_mimic",
    "bezier",
    "polyline",
    "lung_inside",
    "lung_taper",
]

#: a bounding box of the canvas: (z, y, x) index slices
Box = tuple[slice, slice, slice]
#: one lung: centre (cx, cy) and half axes (a, b) in mm at its widest, base and apex as shares of the scan length
LungShape = tuple[float, float, float, float, float, float]
#: `keep(z, y, x, r2)` of `Canvas.ellipses`: which voxels of the ellipses to fill (broadcast arrays)
Keep = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Tissue(IntEnum):
    """Tissue code of each voxel (`PhantomStudy.tissue`), for tests and analysis."""

    AIR = 0
    FAT = 1
    SOFT = 2
    LUNG = 3
    MYOCARDIUM = 4
    LV_BLOOD = 5
    RV_BLOOD = 6
    PULMONARY_ARTERY = 7
    AORTA = 8
    BONE = 9
    EMBOLUS = 10
    CALCIFICATION = 11
    LUNG_VESSEL = 12
    MIMIC = 13


@dataclass(frozen=True)
class Vessel:
    """One contrast-filled pulmonary artery segment: centreline points (N, 3) in mm and radii (N,)."""

    name: str
    kind: str  # main | lpa | rpa | lobar | segmental | subsegmental
    side: str  # central | left | right
    points: np.ndarray
    radii: np.ndarray


@dataclass(frozen=True)
class Embolus:
    """One embolus in vessel `vessel`: its own centreline and radii (mm), HU and whether it holds a calcification."""

    vessel: str
    kind: str  # acute | chronic
    points: np.ndarray
    radii: np.ndarray
    hu: float
    calcified: bool


class Canvas:
    """HU (float32) and tissue (uint8) volumes plus the voxel grid in patient mm."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)  # (dz, dy, dx)
        nz, ny, nx = shape
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.z = (np.arange(nz) * spacing[0]).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)
        self.x = ((np.arange(nx) - (nx - 1) / 2) * spacing[2]).astype(np.float32)
        self.pv = float(np.mean(self.spacing))  # width of the partial-volume ramp in mm

    def index_range(self, axis: int, lo: float, hi: float) -> slice:
        """Indices along `axis` (0 z, 1 y, 2 x) whose coordinates lie in [lo, hi] mm, clipped to the canvas."""
        coords = (self.z, self.y, self.x)[axis]
        i0 = int(np.searchsorted(coords, lo, side="left"))
        i1 = int(np.searchsorted(coords, hi, side="right"))
        return slice(max(i0, 0), min(i1, len(coords)))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Index box of the mm box [lo, hi] (z, y, x), clipped to the canvas; None when empty."""
        b = (self.index_range(0, float(lo[0]), float(hi[0])), self.index_range(1, float(lo[1]), float(hi[1])),
             self.index_range(2, float(lo[2]), float(hi[2])))
        if any(s.stop <= s.start for s in b):
            return None
        return b

    def ellipses(self, value: float, code: int, cx: float | np.ndarray, cy: float | np.ndarray,
                 a: float | np.ndarray, b: float | np.ndarray, zsl: slice, keep: Keep | None = None) -> None:
        """Fill per-slice ellipses (parameters are arrays over the slices of `zsl`)."""
        cx, cy, a, b = (np.broadcast_to(np.asarray(v, dtype=np.float32), (zsl.stop - zsl.start,)) for v in (cx, cy, a, b))
        ok = (a > 0) & (b > 0)
        if not ok.any():
            return
        ys = self.index_range(1, float((cy - b)[ok].min()), float((cy + b)[ok].max()))
        xs = self.index_range(2, float((cx - a)[ok].min()), float((cx + a)[ok].max()))
        if ys.stop <= ys.start or xs.stop <= xs.start:
            return
        a = np.where(ok, a, 1e-6)[:, None, None]
        b = np.where(ok, b, 1e-6)[:, None, None]
        r2 = ((self.x[xs][None, None, :] - cx[:, None, None]) / a) ** 2 + ((self.y[ys][None, :, None] - cy[:, None, None]) / b) ** 2
        mask = r2 <= 1.0
        if keep is not None:
            mask &= keep(self.z[zsl][:, None, None], self.y[ys][None, :, None], self.x[xs][None, :, None], r2)
        self.hu[zsl, ys, xs][mask] = value
        self.tissue[zsl, ys, xs][mask] = code

    def tube_occupancy(self, points: np.ndarray, radii: np.ndarray) -> tuple[Box, np.ndarray] | None:
        """Partial-volume occupancy of a tapered tube on its bounding box; None when the tube misses the canvas."""
        rmax = float(radii.max()) + self.pv
        box = self.box(points.min(0) - rmax, points.max(0) + rmax)
        if box is None:
            return None
        return box, self.occupancy_on(box, points, radii)

    def occupancy_on(self, box: Box, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
        """Partial-volume occupancy (0..1, float32) of a tapered tube on the given `box` (zero where it misses)."""
        occ = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
        origin = np.array([s.start for s in box])
        for i in range(len(points) - 1):
            p0, p1, r0, r1 = points[i], points[i + 1], float(radii[i]), float(radii[i + 1])
            r = max(r0, r1) + self.pv
            sb = self.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
            if sb is None:
                continue
            # clip the segment box to the tube box
            sb = _intersect(sb, box)
            if any(s.stop <= s.start for s in sb):
                continue
            zz = self.z[sb[0]][:, None, None] - p0[0]
            yy = self.y[sb[1]][None, :, None] - p0[1]
            xx = self.x[sb[2]][None, None, :] - p0[2]
            d = p1 - p0
            L2 = float(d @ d) or 1e-9
            t = np.clip((zz * d[0] + yy * d[1] + xx * d[2]) / L2, 0.0, 1.0)
            dist = np.sqrt((zz - t * d[0]) ** 2 + (yy - t * d[1]) ** 2 + (xx - t * d[2]) ** 2)
            rad = r0 + t * (r1 - r0)
            o = np.clip(0.5 + (rad - dist) / self.pv, 0.0, 1.0).astype(np.float32)
            local = tuple(slice(s.start - o0, s.stop - o0) for s, o0 in zip(sb, origin))
            np.maximum(occ[local], o, out=occ[local])
        return occ

    def blend(self, box: Box, occ: np.ndarray, value: float, code: int, core: float = 0.5) -> None:
        """Mix `value` in by occupancy; voxels at least `core` occupied get the tissue `code`."""
        h = self.hu[box]
        h += (np.asarray(value, dtype=np.float32) - h) * occ
        self.tissue[box][occ >= core] = code

    def tube(self, points: np.ndarray, radii: np.ndarray, value: float, code: int) -> None:
        """Blend a tapered tube of `value` into the canvas (tissue `code` where at least half occupied)."""
        found = self.tube_occupancy(points, radii)
        if found is not None:
            self.blend(*found, value, code)


def _intersect(a: Box, b: Box) -> Box:
    """The common part of two index boxes (may be empty: check stop <= start)."""
    z, y, x = (slice(max(s.start, t.start), min(s.stop, t.stop)) for s, t in zip(a, b))
    return z, y, x


def bezier(p0: np.ndarray, c: np.ndarray, p1: np.ndarray, n: int) -> np.ndarray:
    """`n` points of the quadratic Bezier curve from `p0` to `p1` with control point `c`."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p1


def polyline(rng: np.random.Generator, pts: Sequence[np.ndarray], bend: float, step: float) -> np.ndarray:
    """Smooth curve through `pts` (z, y, x mm) with random bends, sampled every ~`step` mm."""
    out: list[np.ndarray] = []
    for p0, p1 in zip(pts[:-1], pts[1:]):
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        length = float(np.linalg.norm(p1 - p0))
        c = (p0 + p1) / 2 + rng.normal(0, bend * length, 3)
        seg = bezier(p0, c, p1, max(3, int(np.ceil(length / step)) + 1))
        out.append(seg if not out else seg[1:])
    return np.concatenate(out)


@dataclass
class Anatomy:
    """Per-study anatomical parameters and the vessel tree (filled by `build_anatomy`)."""

    A: float  # thorax half width (mm)
    B: float  # thorax half depth (mm)
    S: float  # scan length (mm)
    lungs: dict[str, LungShape]  # side -> (cx, cy, a, b, u_base, u_apex)
    vessels: list[Vessel]
    rv_lv_ratio: float
    pa_hu: float


def lung_inside(an: Anatomy, side: str, p: np.ndarray, margin: float = 0.85) -> bool:
    """Whether point `p` (z, y, x mm) lies inside lung `side`, `margin` of the way out from its centre."""
    cx, cy, a, b, u0, u1 = an.lungs[side]
    u = p[0] / an.S
    if not (u0 + 0.03 < u < u1 - 0.03):
        return False
    g = lung_taper(u, u0, u1)
    return ((p[2] - cx) / (a * g)) ** 2 + ((p[1] - cy) / (b * g)) ** 2 < margin**2


def lung_taper(u: np.ndarray | float, u0: float, u1: float) -> np.ndarray:
    """Lung width (share of the widest) at height `u` (share of the scan length), base `u0`, apex `u1`:
    full up to 55 % of the lung's height, then narrowing to 20 % at the apex."""
    mid = u0 + 0.55 * (u1 - u0)
    s = np.clip((u - mid) / (u1 - mid), 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - s**2, 0.04, 1.0))


@dataclass(frozen=True)
class Body:
    """The chest's outline: thorax half width `A` and half depth `B` (mm), scan length `S` (mm),
    the per-slice narrowing towards the neck `scale` (Z,), and the subcutaneous fat (`fat`, a
    share of the outline, at `fat_hu`)."""

    A: float
    B: float
    S: float
    scale: np.ndarray
    fat: float
    fat_hu: float


@dataclass(frozen=True)
class Heart:
    """Where the heart ended up: the RV cavity's centre `rv` (z, y, x mm) and radius `r_rv`, the
    half height `hz` of the heart and the z of its top (where the great arteries leave)."""

    rv: np.ndarray
    r_rv: float
    hz: float
    top: float


#: centre of each hilum (z, y, x mm) and the radius of the pulmonary artery trunk there, per side
Hila = dict[str, tuple[np.ndarray, float]]


def build_anatomy(cv: Canvas, rng: np.random.Generator, *, contrast: tuple[float, float, float],
                  rv_lv_ratio: float, mediastinal_fat_mm: float = 0.0) -> Anatomy:
    """Paint body, lungs, heart, aorta, pulmonary arteries, lung vessels, spine and ribs.

    `contrast` is the (pulmonary artery, aorta and LV, RV) blood HU. `mediastinal_fat_mm` > 0
    wraps the main, left and right pulmonary arteries in a sleeve of fat that thick where they
    run through mediastinal soft tissue (as in a real chest, where the fat shows the artery's
    outer wall); it draws no random numbers, so a study's other content is the same with and
    without it.

    Each step below draws from `rng` in turn, and each later step paints over the earlier ones,
    so the order of the calls is the phantom: moving one (or a draw inside one) changes every
    study generated after it. The arteries are painted after the lung vessels so that a vein
    crossing an artery never cuts its lumen.
    """
    pa_hu, aorta_hu, rv_hu = contrast
    body = draw_body(cv, rng)
    lungs = draw_lungs(cv, rng, body)
    ratio = float(rv_lv_ratio)
    heart = draw_heart(cv, rng, body, ratio, aorta_hu=aorta_hu, rv_hu=rv_hu)
    u_bif = draw_aorta(cv, rng, body, heart, aorta_hu=aorta_hu)
    vessels, hila = pulmonary_artery_tree(rng, body, lungs, heart, u_bif)
    draw_lung_vessels(cv, rng, body, lungs, hila)
    draw_pulmonary_arteries(cv, rng, vessels, pa_hu=pa_hu, mediastinal_fat_mm=mediastinal_fat_mm,
                            fat_hu=body.fat_hu)
    # the bones take the outline averaged over the slices: one spine and one rib cage for the whole scan
    A0 = float(np.mean(body.A * body.scale))
    B0 = float(np.mean(body.B * body.scale))
    draw_spine(cv, rng, B0)
    draw_sternum(cv, B0, body.fat, body.S)
    draw_ribs(cv, rng, A0, B0, body.fat, body.S)
    return Anatomy(A=body.A, B=body.B, S=body.S, lungs=lungs, vessels=vessels, rv_lv_ratio=ratio, pa_hu=pa_hu)


def draw_body(cv: Canvas, rng: np.random.Generator) -> Body:
    """The chest outline: subcutaneous fat around soft tissue, narrowing slightly towards the neck."""
    nz, ny, nx = cv.shape
    fov = min(nx * cv.spacing[2], ny * cv.spacing[1])
    S = nz * cv.spacing[0]
    A = min(rng.uniform(138, 172), 0.46 * fov)
    B = A * rng.uniform(0.62, 0.74)
    allz = slice(0, nz)
    u = cv.z / S
    body_scale = 1.0 - 0.08 * np.clip(u - 0.6, 0, 1)
    fat = rng.uniform(0.04, 0.12)
    fat_hu = rng.uniform(-110, -85)
    cv.ellipses(fat_hu, Tissue.FAT, 0.0, 0.0, A * body_scale, B * body_scale, allz)
    cv.ellipses(rng.uniform(35, 55), Tissue.SOFT, 0.0, 0.0, A * body_scale * (1 - fat), B * body_scale * (1 - fat), allz)
    return Body(A=A, B=B, S=S, scale=body_scale, fat=fat, fat_hu=fat_hu)


def draw_lungs(cv: Canvas, rng: np.random.Generator, body: Body) -> dict[str, LungShape]:
    """Per-slice ellipses tapering to the apex, cut by a diaphragm dome at the base; returns their shapes."""
    A, B, S = body.A, body.B, body.S
    u = cv.z / S
    lungs = {}
    u_apex = rng.uniform(0.9, 0.98)
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        cx = sgn * A * rng.uniform(0.45, 0.5)
        cy = B * rng.uniform(0.0, 0.08)
        a = A * (0.37 if side == "right" else 0.34) * rng.uniform(0.93, 1.05)
        b = B * rng.uniform(0.68, 0.76)
        u_base = rng.uniform(0.1, 0.2) + (0.03 if side == "right" else 0.0)
        lungs[side] = (cx, cy, a, b, u_base, u_apex)
        zsl = cv.index_range(0, u_base * S, u_apex * S)
        g = lung_taper(u[zsl], u_base, u_apex)
        dome = rng.uniform(0.08, 0.14) * S

        def keep(z: np.ndarray, y: np.ndarray, x: np.ndarray, r2: np.ndarray,
                 u_base: float = u_base, dome: float = dome) -> np.ndarray:
            return z >= u_base * S + dome * np.clip(1.0 - r2, 0, 1) * 0.9

        cv.ellipses(-850.0, Tissue.LUNG, cx, cy, a * g, b * g, zsl, keep=keep)
    lung = cv.tissue == Tissue.LUNG
    # gravity-dependent density (posterior lung denser) and low-frequency texture
    grad = rng.uniform(20, 60) * (cv.y / B)[None, :, None]
    tex_k = rng.uniform(0.02, 0.05, size=3)
    tex_p = rng.uniform(0, 2 * np.pi, size=3)
    tex = (np.sin(cv.z * tex_k[0] + tex_p[0])[:, None, None] * np.sin(cv.y * tex_k[1] + tex_p[1])[None, :, None]
           * np.sin(cv.x * tex_k[2] + tex_p[2])[None, None, :]) * rng.uniform(10, 30)
    cv.hu[lung] += (grad + tex)[lung]
    return lungs


def draw_heart(cv: Canvas, rng: np.random.Generator, body: Body, ratio: float, *,
               aorta_hu: float, rv_hu: float) -> Heart:
    """Heart with RV and LV cavities; the ratio of their diameters is the study's RV/LV `ratio`."""
    A, B, S = body.A, body.B, body.S
    u_heart = rng.uniform(0.25, 0.33)
    r_lv = rng.uniform(17, 24)
    r_rv = ratio * r_lv
    lv = np.array([u_heart * S, -0.28 * B, 0.2 * A])
    rv = np.array([u_heart * S + 4, -0.55 * B, -0.02 * A - 0.3 * (r_rv - r_lv)])
    hc = (lv + rv) / 2
    hx = abs(lv[2] - rv[2]) / 2 + max(r_lv, r_rv) + 9
    hy = abs(lv[1] - rv[1]) / 2 + max(r_lv, r_rv) * 0.8 + 9
    hz = min(0.13 * S, 55.0)
    for (c, ax, ay, az), val, code in (
        ((hc, hx, hy, hz), rng.uniform(40, 70), Tissue.MYOCARDIUM),
        ((lv, r_lv, r_lv * 0.9, hz * 0.7), aorta_hu, Tissue.LV_BLOOD),
        ((rv, r_rv, r_rv * 0.75, hz * 0.7), rv_hu, Tissue.RV_BLOOD),
    ):
        zsl = cv.index_range(0, c[0] - az, c[0] + az)
        s = np.sqrt(np.clip(1 - ((cv.z[zsl] - c[0]) / az) ** 2, 0, 1))
        cv.ellipses(val, code, c[2], c[1], ax * s, ay * s, zsl)
    return Heart(rv=rv, r_rv=r_rv, hz=hz, top=hc[0] + hz * 0.75)


def draw_aorta(cv: Canvas, rng: np.random.Generator, body: Body, heart: Heart, *, aorta_hu: float) -> float:
    """Aorta: ascending from the LV, arch, descending beside the spine.

    Returns the height of the pulmonary bifurcation as a share of the scan length (it sits under
    the arch, so the aorta decides it)."""
    A, B, S = body.A, body.B, body.S
    heart_top = heart.top
    u_bif = min(heart_top / S + rng.uniform(0.1, 0.15), 0.82)
    asc0 = np.array([heart_top - 8, -0.25 * B, -0.02 * A])
    arch_top = np.array([min(u_bif * S + 0.1 * S, 0.93 * S), -0.05 * B, 0.0])
    desc_top = np.array([u_bif * S + 0.04 * S, 0.42 * B, 0.14 * A])
    desc_bot = np.array([-10.0, 0.5 * B, 0.1 * A])
    ao = polyline(rng, [asc0, np.array([u_bif * S, -0.22 * B, -0.1 * A]), arch_top, desc_top, desc_bot], 0.03, 6.0)
    r_ao = rng.uniform(11, 15)
    rad = np.interp(np.arange(len(ao)), [0, len(ao) - 1], [r_ao, r_ao * 0.8])
    cv.tube(ao, rad, aorta_hu, Tissue.AORTA)
    return u_bif


def pulmonary_artery_tree(rng: np.random.Generator, body: Body, lungs: dict[str, LungShape], heart: Heart,
                          u_bif: float) -> tuple[list[Vessel], Hila]:
    """Centrelines and radii of the pulmonary arteries: main, left and right trunks, then per lung
    three lobar arteries with segmental and subsegmental branches. Paints nothing: the arteries
    go on last (`draw_pulmonary_arteries`), over the lung vessels."""
    A, B, S = body.A, body.B, body.S
    rv, r_rv, hz = heart.rv, heart.r_rv, heart.hz
    vessels: list[Vessel] = []
    r_main = rng.uniform(11, 15)
    bif = np.array([u_bif * S, -0.12 * B, 0.06 * A])
    rvot = np.array([rv[0] + hz * 0.5, rv[1] + 6, rv[2] + 0.6 * r_rv])
    main = polyline(rng, [rvot, bif], 0.05, 4.0)
    vessels.append(Vessel("main", "main", "central", main, np.full(len(main), r_main)))
    hila = {}
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        cx, cy, a, b, u0, u1 = lungs[side]
        hilum = np.array([bif[0] - rng.uniform(0.0, 0.04) * S - (4 if side == "right" else 0), cy - 0.1 * b, cx - sgn * 0.45 * a])
        mid = (bif + hilum) / 2 + np.array([6.0 if side == "left" else -4.0, 0.15 * B, 0.0])
        pts = polyline(rng, [bif, mid, hilum], 0.04, 4.0)
        r0 = r_main * rng.uniform(0.7, 0.82)
        vessels.append(Vessel(f"{side[0]}pa", f"{side[0]}pa", "central", pts, np.linspace(r0, r0 * 0.8, len(pts))))
        hila[side] = (hilum, r0 * 0.8)

    lobes = {"right": [(0.22, -0.2, 0.0), (-0.08, -0.7, 0.3), (-0.3, 0.55, 0.1)],
             "left": [(0.22, -0.2, 0.0), (-0.1, -0.6, 0.35), (-0.3, 0.55, 0.1)]}
    for side, targets in lobes.items():
        cx, cy, a, b, u0, u1 = lungs[side]
        hilum, r_h = hila[side]
        for li, (du, fy, fx) in enumerate(targets):
            tgt = np.array([hilum[0] + du * S, cy + fy * b, cx + (fx + rng.uniform(-0.15, 0.15)) * a])
            tgt = _pull_inside(lungs, side, tgt, S)
            lob = polyline(rng, [hilum, tgt], 0.1, 3.0)
            r_lob = min(r_h * 0.75, rng.uniform(4.5, 6.5))
            vessels.append(Vessel(f"{side}_lobar{li}", "lobar", side, lob, np.linspace(r_lob, r_lob * 0.75, len(lob))))
            for si in range(int(rng.integers(2, 4))):
                start_i = int(rng.integers(len(lob) // 2, len(lob)))
                start = lob[start_i]
                dirn = lob[-1] - lob[0]
                dirn = dirn / (np.linalg.norm(dirn) + 1e-9) + rng.normal(0, 0.6, 3)
                dirn /= np.linalg.norm(dirn) + 1e-9
                end = _pull_inside(lungs, side, start + dirn * rng.uniform(25, 45), S)
                seg = polyline(rng, [start, end], 0.12, 2.0)
                r_s = rng.uniform(2.3, 3.4)
                vessels.append(Vessel(f"{side}_seg{li}{si}", "segmental", side, seg, np.linspace(r_s, r_s * 0.7, len(seg))))
                for ssi in range(int(rng.integers(0, 3))):
                    d2 = dirn + rng.normal(0, 0.7, 3)
                    d2 /= np.linalg.norm(d2) + 1e-9
                    e2 = _pull_inside(lungs, side, end + d2 * rng.uniform(12, 25), S)
                    sub = polyline(rng, [end, e2], 0.15, 2.0)
                    r_ss = rng.uniform(1.2, 1.8)
                    vessels.append(Vessel(f"{side}_sub{li}{si}{ssi}", "subsegmental", side, sub, np.linspace(r_ss, r_ss * 0.6, len(sub))))
    return vessels, hila


def draw_lung_vessels(cv: Canvas, rng: np.random.Generator, body: Body, lungs: dict[str, LungShape],
                      hila: Hila) -> None:
    """Lung vessels that are not contrast-filled arteries (veins, small vessels): texture and mimics,
    running away from the hilum like the real vascular tree."""
    S = body.S
    n_small = int(rng.integers(120, 200) * min(1.0, S / 300.0))
    for _ in range(max(n_small, 30)):
        side = "left" if rng.random() < 0.5 else "right"
        cx, cy, a, b, u0, u1 = lungs[side]
        p = _pull_inside(lungs, side, np.array([rng.uniform(u0 + 0.05, u1 - 0.08) * S,
                                                cy + rng.uniform(-0.8, 0.8) * b, cx + rng.uniform(-0.8, 0.8) * a]), S)
        away = p - hila[side][0]
        away = away / (np.linalg.norm(away) + 1e-9) + rng.normal(0, 0.4, 3)
        q = _pull_inside(lungs, side, p + away / (np.linalg.norm(away) + 1e-9) * rng.uniform(12, 30), S)
        pts = polyline(rng, [p, q], 0.15, 2.5)
        r = rng.uniform(0.8, 2.2)
        cv.tube(pts, np.linspace(r, r * 0.6, len(pts)), rng.uniform(40, 200), Tissue.LUNG_VESSEL)


def draw_pulmonary_arteries(cv: Canvas, rng: np.random.Generator, vessels: list[Vessel], *, pa_hu: float,
                            mediastinal_fat_mm: float, fat_hu: float) -> None:
    """Paint the arterial tree at `pa_hu` (each vessel within -5..+3 %), first wrapping the central
    arteries in mediastinal fat when `mediastinal_fat_mm` > 0 (that draws nothing from `rng`)."""
    if mediastinal_fat_mm > 0:
        for v in vessels:
            if v.kind in CENTRAL_KINDS:
                _sleeve(cv, v, mediastinal_fat_mm, fat_hu)
    for v in vessels:
        cv.tube(v.points, v.radii, pa_hu * rng.uniform(0.95, 1.03), Tissue.PULMONARY_ARTERY)


def _sleeve(cv: Canvas, v: Vessel, thickness_mm: float, fat_hu: float) -> None:
    """Fat around vessel `v`, `thickness_mm` thick, on mediastinal soft tissue only (not lung, heart or bone)."""
    found = cv.tube_occupancy(v.points, v.radii + thickness_mm)
    if found is None:
        return
    box, occ = found
    m = (occ >= 0.5) & (cv.tissue[box] == Tissue.SOFT)
    cv.hu[box][m] = fat_hu
    cv.tissue[box][m] = Tissue.FAT


def _pull_inside(lungs: dict[str, LungShape], side: str, p: np.ndarray, S: float) -> np.ndarray:
    """`p` moved inside lung `side` (away from base and apex, within 82 % of the outline), a copy."""
    cx, cy, a, b, u0, u1 = lungs[side]
    p = p.copy()
    p[0] = np.clip(p[0], (u0 + 0.12) * S, (u1 - 0.08) * S)
    g = lung_taper(p[0] / S, u0, u1)
    r = np.hypot((p[2] - cx) / (a * g), (p[1] - cy) / (b * g))
    if r > 0.82:
        p[2] = cx + (p[2] - cx) * 0.82 / r
        p[1] = cy + (p[1] - cy) * 0.82 / r
    return p


def draw_spine(cv: Canvas, rng: np.random.Generator, B0: float) -> None:
    """Spine: vertebral bodies with discs, canal, spinous process, behind the chest's centre (`B0` half depth)."""
    allz = slice(0, cv.shape[0])
    vy = 0.62 * B0
    vr = rng.uniform(14, 19)
    period = rng.uniform(24, 30)
    disc = (np.mod(cv.z + rng.uniform(0, period), period) < 5.0)
    cv.ellipses(rng.uniform(650, 750), Tissue.BONE, 0.0, vy, vr, vr * 0.85, allz)
    dz = np.where(disc, vr * 0.8, 0.0)
    cv.ellipses(80.0, Tissue.SOFT, 0.0, vy, dz, dz * 0.85, allz)
    cv.ellipses(30.0, Tissue.SOFT, 0.0, vy + vr + 7, 7.0, 7.0, allz)
    cv.ellipses(800.0, Tissue.BONE, 0.0, vy + vr + 20, 4.0, 7.0, allz)


def draw_sternum(cv: Canvas, B0: float, fat: float, S: float) -> None:
    """Sternum: just inside the anterior chest wall, over the middle of the scan (draws nothing)."""
    cv.ellipses(450.0, Tissue.BONE, 0.0, -B0 * (1 - fat) * 0.93, 12.0, 5.0, cv.index_range(0, 0.3 * S, 0.85 * S))


def draw_ribs(cv: Canvas, rng: np.random.Generator, A0: float, B0: float, fat: float, S: float) -> None:
    """Ribs: a ring in the chest wall; each rib runs down from back to front."""
    Y, X = np.meshgrid(cv.y, cv.x, indexing="ij")
    rho = np.hypot(X / A0, Y / B0)
    ring = (rho > (1 - fat) * 0.9) & (rho < (1 - fat) * 0.97) & (np.abs(X) > 0.22 * A0)
    iy, ix = np.nonzero(ring)
    if iy.size == 0:
        return
    theta_y = Y[iy, ix] / B0  # -1 front .. +1 back
    period = rng.uniform(24, 32)
    drop = period * rng.uniform(2.0, 3.0)
    zr = cv.z[:, None] + drop * (1 - theta_y[None, :]) / 2 + rng.uniform(0, period)
    thick = rng.uniform(7, 10)
    on = (np.mod(zr, period) < thick) & (cv.z[:, None] > 0.15 * S) & (cv.z[:, None] < 0.95 * S)
    kz, kr = np.nonzero(on)
    cv.hu[kz, iy[kr], ix[kr]] = rng.uniform(450, 650)
    cv.tissue[kz, iy[kr], ix[kr]] = Tissue.BONE


#: where an embolus may sit, with the draw weights: vessel kind -> (weight, length range mm)
_SITES = {"main": (0.07, (10, 35)), "lpa": (0.1, (8, 30)), "rpa": (0.12, (8, 30)),
          "lobar": (0.3, (5, 22)), "segmental": (0.3, (3, 12)), "subsegmental": (0.11, (2, 7))}


def _resample(points: np.ndarray, radii: np.ndarray, s0: float, s1: float,
              step: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The centreline and radii between arc lengths `s0` and `s1` (mm), every ~`step` mm, and the total length."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(s0, s1, max(3, int(np.ceil((s1 - s0) / step)) + 1))
    pts = np.stack([np.interp(s, arc, points[:, a]) for a in range(3)], axis=1)
    return pts, np.interp(s, arc, radii), arc[-1]


#: vessel kinds from the largest to the smallest; `place_emboli(smallest=...)` cuts the list there
VESSEL_KINDS = tuple(_SITES)
#: the central arteries (the RSNA label `central_pe`); `smallest="central"` keeps emboli in them
CENTRAL_KINDS = ("main", "lpa", "rpa")


def place_emboli(rng: np.random.Generator, vessels: list[Vessel], chronicity: str, n: int,
                 smallest: str = "subsegmental") -> list[Embolus]:
    """Draw `n` emboli in the arterial tree; `chronicity` is acute | chronic | acute_and_chronic;
    `smallest` is the smallest vessel kind that may hold one (see `VESSEL_KINDS`), or "central"
    for the main, left and right pulmonary arteries only."""
    kinds = list(CENTRAL_KINDS if smallest == "central" else VESSEL_KINDS[: VESSEL_KINDS.index(smallest) + 1])
    w = np.array([_SITES[k][0] for k in kinds])
    out = []
    for i in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        cands = [v for v in vessels if v.kind == kind] or [v for v in vessels if v.kind == "lobar"]
        v = cands[int(rng.integers(len(cands)))]
        total = float(np.linalg.norm(np.diff(v.points, axis=0), axis=1).sum())
        lo, hi = _SITES[v.kind][1]
        L = min(rng.uniform(lo, hi), 0.9 * total)
        s0 = rng.uniform(0, total - L)
        pts, rv, _ = _resample(v.points, v.radii, s0, s0 + L, 1.0)
        t = np.linspace(0, 1, len(pts))
        prof = np.clip(np.sin(np.pi * t) ** 0.35, 0.35, 1.0)
        if chronicity == "chronic" or (chronicity == "acute_and_chronic" and (i % 2 == 1)):
            kind_e = "chronic"
        else:
            kind_e = "acute"
        if kind_e == "acute":
            f = rng.uniform(0.6, 1.05) if v.kind in ("segmental", "subsegmental") else rng.uniform(0.4, 0.8)
            out.append(Embolus(v.name, "acute", pts, rv * f * prof, rng.uniform(22, 60), False))
        else:
            tangent = pts[-1] - pts[0]
            tangent /= np.linalg.norm(tangent) + 1e-9
            nrm = np.cross(tangent, rng.normal(size=3))
            nrm /= np.linalg.norm(nrm) + 1e-9
            f = rng.uniform(0.55, 0.85)
            rc = rv * f * prof
            off = (rv - 0.55 * rc)[:, None] * nrm[None, :]
            out.append(Embolus(v.name, "chronic", pts + off, rc, rng.uniform(45, 78), bool(rng.random() < 0.3)))
    if chronicity == "acute_and_chronic" and n >= 1 and not any(e.kind == "chronic" for e in out):
        out[-1] = Embolus(out[-1].vessel, "chronic", out[-1].points, out[-1].radii, 60.0, False)
    return out


def paint_emboli(cv: Canvas, vessels: list[Vessel], emboli: list[Embolus],
                 rng: np.random.Generator) -> tuple[np.ndarray, list[Embolus]]:
    """Paint emboli (clipped to their vessel's lumen); return the voxel mask and the emboli that show."""
    by_name = {v.name: v for v in vessels}
    mask = np.zeros(cv.shape, dtype=bool)
    shown = []
    for e in emboli:
        found = cv.tube_occupancy(e.points, e.radii)
        if found is None:
            continue
        box, occ = found
        v = by_name[e.vessel]
        lumen = cv.occupancy_on(box, v.points, v.radii)
        occ = np.minimum(occ, lumen)
        m = occ >= 0.5
        if not m.any():
            continue
        # tissue EMBOLUS marks the core (>= 95 % occupied); the label mask is every voxel >= 50 %
        cv.blend(box, occ, e.hu, Tissue.EMBOLUS, core=0.95)
        if e.calcified:
            k = int(rng.integers(len(e.points)))
            c = e.points[k]
            cocc = cv.occupancy_on(box, np.stack([c, c + 0.5]), np.full(2, max(0.8, 0.35 * float(e.radii[k]))))
            cocc = np.minimum(cocc, occ)
            cv.blend(box, cocc, rng.uniform(400, 700), Tissue.CALCIFICATION, core=0.8)
        mask[box] |= m
        shown.append(e)
    return mask, shown


def paint_mimic(cv: Canvas, vessels: list[Vessel], kind: str, pa_hu: float, rng: np.random.Generator) -> None:
    """A negative study's look-alike: a flow (mixing) artifact or a non-embolic filling defect."""
    lobars = [v for v in vessels if v.kind == "lobar"]
    v = lobars[int(rng.integers(len(lobars)))]
    total = float(np.linalg.norm(np.diff(v.points, axis=0), axis=1).sum())
    if kind == "flow_artifact":
        L = min(rng.uniform(8, 20), 0.8 * total)
        s0 = rng.uniform(0, total - L)
        pts, rv, _ = _resample(v.points, v.radii, s0, s0 + L, 1.0)
        found = cv.tube_occupancy(pts, rv * 0.9)
        if found is not None:
            box, occ = found
            cv.blend(box, occ * 0.55, pa_hu * rng.uniform(0.35, 0.5), Tissue.MIMIC)
    else:  # a soft-tissue mass pressing on the artery from outside
        k = int(rng.integers(len(v.points)))
        nrm = np.cross(v.points[-1] - v.points[0], rng.normal(size=3))
        nrm /= np.linalg.norm(nrm) + 1e-9
        r = rng.uniform(6, 12)
        c = v.points[k] + nrm * (float(v.radii[k]) + 0.6 * r)
        cv.tube(np.stack([c, c + nrm]), np.full(2, r), rng.uniform(35, 55), Tissue.MIMIC)
