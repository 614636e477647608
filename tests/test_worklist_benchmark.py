"""benchmarks/worklist.py: the queue simulation, the load calibration and the printed comparison."""

from __future__ import annotations

import re

import numpy as np
import pytest

from benchmarks import worklist


def test_one_reader_reads_fifo_or_by_key_without_preempting():
    arrivals, reading = np.array([0.0, 1.0, 2.0]), np.array([10.0, 10.0, 10.0])
    assert worklist.simulate(arrivals, reading, None, 1).tolist() == [0.0, 9.0, 18.0]
    keys = [(1.0, 0.0), (1.0, 1.0), (0.0, 2.0)]  # the last arrival ranks first: read once the reader is free
    assert worklist.simulate(arrivals, reading, keys, 1).tolist() == [0.0, 19.0, 8.0]
    assert worklist.simulate(arrivals, reading, keys, 1, adherence=0.0).tolist() == [0.0, 9.0, 18.0]
    assert worklist.simulate(arrivals, reading, None, 3).tolist() == [0.0, 0.0, 0.0]
    assert worklist.simulate(np.array([0.0, 50.0]), reading[:2], None, 1).tolist() == [0.0, 0.0]  # idle, then next


def test_inverse_normal_and_binormal_fit_reproduce_the_operating_point():
    assert worklist._phi_inv(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert worklist._phi_inv(0.01) == pytest.approx(-2.326348, abs=1e-6)
    s = worklist.make_stream(200_000, 0.5, 26.4, 0.5, seed=3)
    keys, classes = worklist.priority_keys(s, np.arange(len(s.gaps), dtype=float), 0.71, 0.76, 0.4, 0.0)
    flagged = np.array([k[0] <= 1 for k in keys])  # critical or urgent
    assert flagged[s.positive].mean() == pytest.approx(0.71, abs=0.01)  # sensitivity
    assert (~flagged[~s.positive]).mean() == pytest.approx(0.76, abs=0.01)  # specificity
    assert classes["check"] == 0


def test_load_is_calibrated_to_the_fifo_wait_and_priority_moves_positives_forward(capsys):
    s = worklist.make_stream(6000, 0.12, 26.4, 0.5, seed=5)
    rate = worklist.calibrate_rate(s, 2, 33.4, 100)
    fifo = worklist.simulate(np.cumsum(s.gaps) / rate, s.reading_min, None, 2)[100:]
    assert fifo.mean() == pytest.approx(33.4, rel=0.01)
    assert worklist.main(["--days", "40", "--no-sweep", "--models", "demo", "perfect"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^(demo|perfect)\s+\S+\s+\S+\s+([\d.]+) /\s+([\d.]+) min\s+([\d.]+) /\s+([\d.]+) min\s+([\d.]+)%\s+"
        r"([\d.]+) ->\s+([\d.]+) min", out, flags=re.M)}
    assert set(rows) == {"demo", "perfect"}
    for fifo_mean, _fifo_p90, ours_mean, _ours_p90, reduction, neg_fifo, neg_ours in rows.values():
        assert float(ours_mean) < float(fifo_mean) and float(neg_ours) > float(neg_fifo)
        assert float(reduction) == pytest.approx(100 * (1 - float(ours_mean) / float(fifo_mean)), abs=0.2)
    assert float(rows["perfect"][4]) > float(rows["demo"][4])  # a better model helps more
