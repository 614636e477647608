"""What worklist prioritisation is worth: simulated reading of CTPAs, first-in-first-out vs by our priority.

    .venv/bin/python benchmarks/worklist.py [--days 365] [--radiologists 2] [--prevalence 0.12]

A discrete-event simulation of a CTPA worklist read by `--radiologists` radiologists. Studies arrive
as a Poisson stream; each radiologist, when free, opens the next study of the list and reads it for a
log-normal time (mean 26.4 min, the reading time Batra et al. measured with and without AI: 26.3 and
26.5 min; coefficient of variation `--reading-cv`). The arrival rate is calibrated (bisection on a
fixed random stream) so that the first-in-first-out wait is Batra et al.'s pre-AI wait of PE-positive
CTPAs, 33.4 min: the simulated department is as busy as theirs.

Each study is PE-positive with probability `--prevalence`. The model's call comes from a binormal
score (negatives N(0, 1), positives N(d, 1), threshold t) fitted to a measured operating point
(sensitivity, specificity on held-out phantoms, docs/benchmarks.md): t = Phi^-1(spec),
d = t - Phi^-1(1 - sens). Its priority is decided by the node's own rules
(`dicom_node.engine.priority.decide_priority`, default `[priority]`) from `Findings` built per study:
PE probability = logistic(score - t) (0.5 at the threshold), the model's PE call = score >= t,
central PE / RV-LV >= 1 called on `--critical-share` of flagged studies, and `--check-share` of all
studies indeterminate or failed (class `check`). The prioritised list is read in the node's order:
class (critical, urgent, check, routine), then score, then arrival (`State.worklist`); reading is
non-preemptive (a started study is finished).

Printed per operating point: mean and 90th-percentile wait (arrival -> reading starts) of
PE-positive studies under FIFO and under our order, the reduction of the positive mean wait
(target >= 36 %, Batra et al.: 33.4 -> 21.4 min), and the extra wait of PE-negative studies (mean
and p90 of the difference per study). Then the reduction at other loads and prevalences.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.engine.priority import Findings, decide_priority  # noqa: E402
from dicom_node.labels import STUDY_LABELS  # noqa: E402

#: Batra et al., AJR 2023 (UT Southwestern), PE-positive CTPAs without -> with AI re-prioritisation
BATRA_WAIT_MIN = (33.4, 21.4)
BATRA_READING_MIN = (26.3, 26.5)
TARGET_REDUCTION = 1 - BATRA_WAIT_MIN[1] / BATRA_WAIT_MIN[0]  # 0.359

#: operating points of the study PE flag on held-out phantom test studies (docs/benchmarks.md)
OPERATING_POINTS: dict[str, tuple[float, float, str]] = {
    "demo": (0.71, 0.76, "bundled demo model 0.2.0 = run G: 82 held-out phantom test studies (dicom_node/model/README.md)"),
    "run-M": (0.90, 0.95, "run M (tiny preset, all seven targets met): test studies at the validation threshold"),
    "perfect": (1.0, 1.0, "an oracle: the bound of what ordering can do at this load"),
}


def _phi_inv(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9), for 0 < p < 1."""
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
         -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
         -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
         4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - 0.02425:
        return -_phi_inv(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


@dataclass(frozen=True)
class Stream:
    """One fixed random stream of studies (common random numbers for every order and load)."""

    gaps: np.ndarray  # unit-rate exponential inter-arrival gaps
    reading_min: np.ndarray
    positive: np.ndarray  # bool
    noise: np.ndarray  # N(0, 1) of the binormal score
    critical_u: np.ndarray  # U(0, 1): central / RV-LV >= 1 called when < critical_share
    check_u: np.ndarray  # U(0, 1): indeterminate or failed when < check_share


def make_stream(n: int, prevalence: float, reading_mean: float, reading_cv: float, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(math.log(1 + reading_cv ** 2))
    return Stream(gaps=rng.exponential(1.0, n),
                  reading_min=rng.lognormal(math.log(reading_mean) - sigma ** 2 / 2, sigma, n),
                  positive=rng.random(n) < prevalence, noise=rng.standard_normal(n),
                  critical_u=rng.random(n), check_u=rng.random(n))


def simulate(arrivals: np.ndarray, reading: np.ndarray, keys: Sequence[tuple[float, ...]] | None,
             radiologists: int, adherence: float = 1.0, seed: int = 0) -> np.ndarray:
    """Wait (min) of each study: non-preemptive, `radiologists` readers; `keys` = reading order (None = FIFO).

    `adherence`: the share of picks that take the top of the prioritised list; the others take the
    oldest waiting study (a radiologist reading in arrival order after all)."""
    n = len(arrivals)
    rng = np.random.default_rng(seed)
    free = [0.0] * radiologists
    heapq.heapify(free)
    ordered: list[tuple[tuple[float, ...], int]] = []
    oldest: list[tuple[float, int]] = []
    taken = np.zeros(n, dtype=bool)
    wait = np.empty(n)
    i = done = 0
    while done < n:
        t = heapq.heappop(free)
        if done == i and i < n and arrivals[i] > t:  # nobody waiting: the reader idles until the next arrival
            t = float(arrivals[i])
        while i < n and arrivals[i] <= t:
            heapq.heappush(ordered, ((float(arrivals[i]),) if keys is None else keys[i], i))
            if keys is not None and adherence < 1.0:
                heapq.heappush(oldest, (float(arrivals[i]), i))
            i += 1
        queue: list = ordered if keys is None or adherence >= 1.0 or rng.random() < adherence else oldest
        while True:
            _, j = heapq.heappop(queue)
            if not taken[j]:
                break
        taken[j] = True
        wait[j] = t - arrivals[j]
        heapq.heappush(free, t + float(reading[j]))
        done += 1
    return wait


def priority_keys(s: Stream, arrivals: np.ndarray, sens: float, spec: float, critical_share: float,
                  check_share: float) -> tuple[list[tuple[float, ...]], dict[str, int]]:
    """The node's order for each study: (class rank, -score, arrival), classes from `decide_priority`."""
    if sens >= 1.0 and spec >= 1.0:  # oracle: every positive well above, every negative well below the threshold
        t, score = 0.0, np.where(s.positive, 10.0, -10.0) + 0.1 * s.noise
    else:
        t = _phi_inv(spec)
        d = t - _phi_inv(1 - sens)
        score = s.noise + np.where(s.positive, d, 0.0)
    keys, classes = [], {"critical": 0, "urgent": 0, "check": 0, "routine": 0}
    no = {k: False for k in STUDY_LABELS}
    for k in range(len(score)):
        flagged = bool(score[k] >= t)
        labels = dict(no)
        if flagged:
            labels["central_pe"] = bool(s.critical_u[k] < critical_share)
        else:
            labels["indeterminate" if s.check_u[k] < check_share else "negative_exam_for_pe"] = True
        p = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, float(score[k] - t)))))
        decision = decide_priority(Findings(p, flagged, labels))
        if not flagged and s.check_u[k] < check_share:
            assert decision.priority.value == "check"
        classes[decision.priority.value] += 1
        keys.append((float(decision.priority.rank), -decision.score, float(arrivals[k])))
    return keys, classes


def calibrate_rate(s: Stream, radiologists: int, target_wait: float, warmup: int) -> float:
    """Arrivals per minute that give a FIFO mean wait of `target_wait` min (bisection)."""
    cap = radiologists / float(np.mean(s.reading_min))  # the service rate: utilisation 1
    lo, hi = 0.05 * cap, 0.999 * cap
    for _ in range(40):
        mid = (lo + hi) / 2
        w = simulate(np.cumsum(s.gaps) / mid, s.reading_min, None, radiologists)[warmup:]
        lo, hi = (mid, hi) if w.mean() < target_wait else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Outcome:
    name: str
    sens: float
    spec: float
    utilisation: float
    fifo_pos: np.ndarray
    prio_pos: np.ndarray
    fifo_neg: np.ndarray
    prio_neg: np.ndarray
    classes: dict[str, int]

    @property
    def reduction(self) -> float:
        return 1 - float(self.prio_pos.mean()) / float(self.fifo_pos.mean())


def run(s: Stream, rate: float, radiologists: int, sens: float, spec: float, name: str, critical_share: float,
        check_share: float, warmup: int, adherence: float = 1.0) -> Outcome:
    arrivals = np.cumsum(s.gaps) / rate
    fifo = simulate(arrivals, s.reading_min, None, radiologists)
    keys, classes = priority_keys(s, arrivals, sens, spec, critical_share, check_share)
    prio = simulate(arrivals, s.reading_min, keys, radiologists, adherence)
    keep = np.arange(len(arrivals)) >= warmup
    pos, neg = keep & s.positive, keep & ~s.positive
    util = rate * float(np.mean(s.reading_min)) / radiologists
    return Outcome(name, sens, spec, util, fifo[pos], prio[pos], fifo[neg], prio[neg], classes)


def _p90(x: np.ndarray) -> float:
    return float(np.percentile(x, 90))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=float, default=365.0, help="simulated days of continuous reading (default 365)")
    ap.add_argument("--radiologists", type=int, default=2, help="radiologists reading the CTPA list at once (default 2)")
    ap.add_argument("--prevalence", type=float, default=0.12, help="share of CTPAs with PE (default 0.12)")
    ap.add_argument("--fifo-wait", type=float, default=BATRA_WAIT_MIN[0],
                    help="FIFO mean wait the load is calibrated to, minutes (default 33.4, Batra et al. without AI)")
    ap.add_argument("--reading-min", type=float, default=sum(BATRA_READING_MIN) / 2,
                    help="mean reading time, minutes (default 26.4, Batra et al.)")
    ap.add_argument("--reading-cv", type=float, default=0.5, help="coefficient of variation of reading time (default 0.5)")
    ap.add_argument("--critical-share", type=float, default=0.4,
                    help="share of flagged studies also called central PE or RV/LV >= 1 (default 0.4)")
    ap.add_argument("--check-share", type=float, default=0.02,
                    help="share of unflagged studies indeterminate or failed, class check (default 0.02)")
    ap.add_argument("--adherence", type=float, default=1.0,
                    help="share of picks that follow our order; the rest take the oldest study (default 1.0)")
    ap.add_argument("--models", nargs="+", default=list(OPERATING_POINTS), choices=list(OPERATING_POINTS))
    ap.add_argument("--no-sweep", action="store_true", help="skip the load and prevalence table")
    ap.add_argument("--seed", type=int, default=20)
    args = ap.parse_args(list(argv) if argv is not None else None)
    if not 0 < args.prevalence < 1 or args.radiologists < 1 or args.days <= 0:
        print("benchmarks/worklist.py: --prevalence must be 0-1 (exclusive), --radiologists >= 1, --days > 0",
              file=sys.stderr)
        return 2

    def stream_and_rate(prevalence: float, fifo_wait: float) -> tuple[Stream, float, int]:
        probe = make_stream(1000, prevalence, args.reading_min, args.reading_cv, args.seed)
        rough = calibrate_rate(probe, args.radiologists, fifo_wait, 100)
        n = max(2000, int(args.days * 24 * 60 * rough))
        s = make_stream(n, prevalence, args.reading_min, args.reading_cv, args.seed)
        warmup = n // 50
        return s, calibrate_rate(s, args.radiologists, fifo_wait, warmup), warmup

    s, rate, warmup = stream_and_rate(args.prevalence, args.fifo_wait)
    print(f"worklist simulation: {len(s.gaps)} CTPAs over {args.days:g} days ({rate * 60 * 24:.1f} per day, "
          f"first {warmup} discarded as warm-up), {args.radiologists} radiologists, reading {args.reading_min:g} min mean "
          f"(cv {args.reading_cv:g}), PE prevalence {args.prevalence:.0%}, load calibrated to a FIFO mean wait of "
          f"{args.fifo_wait:g} min (utilisation {rate * args.reading_min / args.radiologists:.1%})")
    print(f"target: PE-positive mean wait reduced by >= {TARGET_REDUCTION:.1%} (Batra et al.: "
          f"{BATRA_WAIT_MIN[0]} -> {BATRA_WAIT_MIN[1]} min)\n")
    head = (f"{'model':<8} {'sens':>5} {'spec':>5}  {'PE+ FIFO mean/p90':>18}  {'PE+ ours mean/p90':>18}  "
            f"{'reduction':>9}  {'PE- FIFO -> ours mean':>22}  {'PE- extra mean/p90':>18}  target")
    print(head)
    results = []
    for name in args.models:
        sens, spec, source = OPERATING_POINTS[name]
        o = run(s, rate, args.radiologists, sens, spec, name, args.critical_share, args.check_share, warmup,
                args.adherence)
        results.append((o, source))
        extra = o.prio_neg - o.fifo_neg
        print(f"{name:<8} {sens:>5.2f} {spec:>5.2f}  {o.fifo_pos.mean():>8.1f} / {_p90(o.fifo_pos):>6.1f} min  "
              f"{o.prio_pos.mean():>8.1f} / {_p90(o.prio_pos):>6.1f} min  {o.reduction:>9.1%}  "
              f"{o.fifo_neg.mean():>9.1f} -> {o.prio_neg.mean():>6.1f} min  {extra.mean():>+7.1f} / {_p90(extra):>+6.1f} min  "
              f"{'met' if o.reduction >= TARGET_REDUCTION else 'NOT met'}")
    print()
    for o, source in results:
        total = sum(o.classes.values())
        print(f"{o.name}: {source}; classes " + ", ".join(f"{k} {v / total:.1%}" for k, v in o.classes.items())
              + f"; PE+ studies {len(o.fifo_pos)}")
    if args.no_sweep:
        return 0
    print("\nreduction of the PE-positive mean wait at other loads, prevalences and adherence (same stream seed):")
    print(f"{'FIFO mean wait':>14} {'prevalence':>10} {'adherence':>9}  " + "  ".join(f"{m:>8}" for m in args.models))
    for fifo_wait, prevalence, adherence in ((15.0, args.prevalence, args.adherence), (60.0, args.prevalence, args.adherence),
                                             (args.fifo_wait, 0.06, args.adherence), (args.fifo_wait, 0.20, args.adherence),
                                             (args.fifo_wait, args.prevalence, 0.75), (args.fifo_wait, args.prevalence, 0.5),
                                             (args.fifo_wait, args.prevalence, 0.25)):
        s2, rate2, warm2 = stream_and_rate(prevalence, fifo_wait)
        cells = []
        for name in args.models:
            sens, spec, _ = OPERATING_POINTS[name]
            cells.append(run(s2, rate2, args.radiologists, sens, spec, name, args.critical_share, args.check_share,
                             warm2, adherence).reduction)
        print(f"{fifo_wait:>10.1f} min {prevalence:>10.0%} {adherence:>9.0%}  " + "  ".join(f"{c:>8.1%}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
