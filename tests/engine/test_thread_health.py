"""A failing log never stops the node's threads, and a dead worker thread makes /healthz 503 naming it
(issue 22, corpus case 7). A real node on loopback, its /healthz read over HTTP."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import pytest

from dicom_node.engine.background import BackgroundLoop
from dicom_node.engine.health import thread_liveness
from dicom_node.log import configure_logging, log_sink_status
from nodekit import phantom_series, storescu, wait_until
from peers import free_port

pytestmark = [pytest.mark.dcmtk]


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class _Brittle(BackgroundLoop):
    """A loop whose first `_run` raises, as a bug inside a poll's own error handling would."""

    thread_name = "brittle"
    restart_delay_s = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def _run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise OSError(32, "Broken pipe")
        self._stop.wait(30)


def test_a_loop_whose_run_raises_is_restarted_and_stays_alive():
    loop = _Brittle()
    loop.start()
    try:
        wait_until(lambda: loop.runs == 2, 10, "the second run")
        assert loop.alive and loop.restarts == 1 and loop.last_error == "BrokenPipeError: [Errno 32] Broken pipe"
        assert thread_liveness([loop]) == (True, [])
    finally:
        loop.stop()
    assert thread_liveness([loop]) == (True, [])  # stopping is not a fault


def test_a_dead_completion_thread_makes_healthz_503_naming_it(make_node, tmp_path):
    mport = free_port()
    node = make_node([], metrics_port=mport)
    assert _get(mport, "/healthz")[0] == 200

    def fatal(now=None):  # an error that is no Exception ends the thread for good (as a real bug could)
        raise SystemExit("completion thread ended (test)")

    node.completion.poll_once = fatal
    wait_until(lambda: not node.completion.alive, 10, "the completion thread ends")
    code, body = _get(mport, "/healthz")
    assert code == 503 and body["ok"] is False
    (reason,) = body["reasons"]
    assert reason.startswith("thread completion is not running") and "restart the node" in reason


class _Refusing(io.TextIOBase):
    """A log stream that fails every write, as stdout does once the reading `jq` has crashed (EPIPE)."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_log_stream_that_fails_every_write_does_not_stop_receiving_completion_or_analysis(make_node, tmp_path,
                                                                                             storescp):
    mport = free_port()
    node = make_node([f"STORESCP@127.0.0.1:{storescp.port}"], metrics_port=mport)
    before = log_sink_status()["dropped"]
    configure_logging(json=True, level="INFO", stream=_Refusing())
    try:
        assert storescu(node.port, phantom_series(tmp_path / "in", n_slices=20)).returncode == 0
        wait_until(lambda: any(storescp.outdir.iterdir()), 60, "the result at the PACS")
        code, body = _get(mport, "/healthz")
    finally:
        configure_logging(json=True, level="INFO", stream=open(tmp_path / "after.log", "w"))
    assert code == 200 and body["ok"] is True
    assert body["log_sink"]["dropped"] > before and "BrokenPipeError" in body["log_sink"]["last_error"]
    assert all(loop.alive for loop in node._loops())


def test_a_log_pipe_nobody_reads_does_not_block_analysis(make_node, tmp_path, storescp):
    """The reader of stdout hangs (a stopped `jq`): the pipe fills, and a plain write() would block every
    thread at its next log line while the SCP kept acknowledging instances."""
    import fcntl
    import os

    node = make_node([f"STORESCP@127.0.0.1:{storescp.port}"])
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: one page, full after a dozen lines
    stream = os.fdopen(w, "w", buffering=1)
    configure_logging(json=True, level="DEBUG", stream=stream)  # DEBUG: a line per instance, the pipe fills at once
    try:
        assert storescu(node.port, phantom_series(tmp_path / "in", n_slices=20)).returncode == 0
        wait_until(lambda: any(storescp.outdir.iterdir()), 60, "the result at the PACS while nobody reads the log")
    finally:
        configure_logging(json=True, level="INFO", stream=open(tmp_path / "after.log", "w"))
        os.close(r)
