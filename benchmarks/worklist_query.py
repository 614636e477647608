"""The worklist query: `State.worklist` over N series with two job revisions each.

    .venv/bin/python benchmarks/worklist_query.py [--series 1000 5000] [--repeats 20]

Fills a fresh state database (the node's schema, every migration applied) with N done series,
each with two jobs (revision 1 and 2, the newest carrying a priority class, reason and score),
then times `State.worklist(READING_ORDER)` listing all of them (the web worklist and the API read
it). Printed per N: median and max of `--repeats` calls, in ms, and rows returned.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.durability.state import State  # noqa: E402
from dicom_node.engine.priority import READING_ORDER  # noqa: E402

ORDER = [p.value for p in READING_ORDER]


def fill(path: Path, n: int) -> None:
    State(path).close()  # schema
    c = sqlite3.connect(path)
    with c:
        for i in range(n):
            series, study = f"1.2.826.0.1.{i}.1", f"1.2.826.0.1.{i}"
            c.execute("INSERT INTO series(series_uid, study_uid, state, first_instance_at, last_instance_at, n_instances,"
                      " calling_aet) VALUES (?,?,?,?,?,?,?)", (series, study, "done", float(i), float(i), 300, "CT"))
            for rev in (1, 2):
                c.execute("INSERT INTO jobs(series_uid, study_uid, state, revision, priority_class, priority_reason,"
                          " priority_score, times) VALUES (?,?,?,?,?,?,?,?)",
                          (series, study, "done", rev, ORDER[i % 4], "PE suspected (probability 0.90)", (i % 97) / 97,
                           '{"received": 1.0, "finished": 2.0}'))
    c.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, nargs="+", default=[1000, 5000], help="series in the database (default 1000 5000)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per size (default 20)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    for n in args.series:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "state.sqlite"
            fill(path, n)
            st = State(path)
            st.worklist(ORDER, limit=n)  # warm the page cache
            times, rows = [], 0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                rows = len(st.worklist(ORDER, limit=n))
                times.append(time.perf_counter() - t0)
            st.close()
        print(f"{n} series: State.worklist median {statistics.median(times) * 1000:.1f} ms, "
              f"max {max(times) * 1000:.1f} ms ({rows} rows, {args.repeats} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
