"""After a restart the quiet period of a series still receiving counts from the node's start (real SQLite)."""

from __future__ import annotations

import time

from dicom_node.config import load_config
from dicom_node.durability.spool import Spool
from dicom_node.durability.state import InstanceRow, SeriesState, State
from dicom_node.engine.completion import CompletionScheduler


def _row(sop: str, series: str, t: float) -> InstanceRow:
    return InstanceRow(sop, series, "1.2", f"/x/{sop}.dcm", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", t, 10,
                       "SCU")


def test_a_series_cut_off_by_a_crash_waits_a_quiet_period_from_the_start_and_a_forced_one_does_not(tmp_path):
    config = load_config(None, environ={}, overrides={"data_dir": str(tmp_path), "quiet_period_s": 10.0})
    state = State(tmp_path / "state.sqlite")
    before_crash = time.time() - 600.0  # the last instance arrived long ago, then the node was down
    state.add_instance(_row("1.2.3.1", "1.2.3", before_crash))
    state.add_instance(_row("1.2.4.1", "1.2.4", before_crash))
    state.force_complete("1.2.4")  # `dicom-node complete`: due at once
    scheduler = CompletionScheduler(config, state, Spool(tmp_path))
    now = scheduler.started_at + 1.0
    scheduler.poll_once(now)
    assert state.series("1.2.3").state is SeriesState.RECEIVING
    assert state.series("1.2.4").state is SeriesState.SKIPPED  # completed (then skipped: no spooled file)
    scheduler.poll_once(scheduler.started_at + 10.5)
    assert state.series("1.2.3").state is SeriesState.SKIPPED
