"""The log of `dicom-node serve` is a JSON stream: every stdout line one object, never PHI.

A real `dicom-node serve` subprocess (stdout and stderr kept apart) receives a phantom study
from dcmtk storescu, receives it again (duplicates), and delivers to a dcmtk storescp and to a
closed port (retries, then `delivery_failed`). Every stdout line must parse with `json.loads`;
lines of other libraries (pynetdicom, highdicom, Python warnings) carry `level` and `logger`;
duplicates are summarised per series; patient name, ID and birth date appear nowhere.
The in-process tests cover what the subprocess runs cannot provoke on demand: a library message
carrying a patient name, a Python warning, and console mode.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from dicom_node.log import configure_logging
from nodekit import PATIENT_BIRTH, PATIENT_ID, PATIENT_NAME, NodeProcess, phantom_series, storescu, wait_until
from peers import free_port, wait_for_port

pytestmark = pytest.mark.dcmtk

PHI = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH, "Testperson", "Phantomina", "93817264", "1947-02-13")


class StreamNode(NodeProcess):
    """NodeProcess with stdout and stderr in separate files and a choice of job."""

    def __init__(self, workdir: Path, *, job: str = "nodekit:SC_JOB", **kw) -> None:
        super().__init__(workdir, **kw)
        self.job = job
        self.out_path = workdir / "serve.stdout"
        self.err_path = workdir / "serve.stderr"

    def start(self) -> StreamNode:
        out, err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config),
                                      "--job", self.job], stdout=out, stderr=err, env=self.env)
        out.close()
        err.close()
        wait_for_port(self.port, proc=self.proc, timeout=60)
        return self

    def lines(self) -> list[dict]:
        """Every stdout line as JSON (fails naming the first line that is not one JSON object)."""
        parsed = []
        for n, line in enumerate(self.out_path.read_text(errors="replace").splitlines(), 1):
            try:
                obj = json.loads(line)
            except ValueError:
                pytest.fail(f"stdout line {n} is not JSON: {line[:300]!r}")
            assert isinstance(obj, dict), f"stdout line {n} is JSON but not an object: {line[:300]!r}"
            parsed.append(obj)
        return parsed

    def stdout_has(self, needle: str) -> bool:
        return needle in self.out_path.read_text(errors="replace")

    def stdout_count(self, needle: str) -> int:
        return self.out_path.read_text(errors="replace").count(needle)


def _broken_peer(port: int) -> None:
    """A peer that sends an A-ASSOCIATE-RQ PDU whose 10 bytes do not decode, then hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes([0x01, 0, 0, 0, 0, 10]) + bytes(10))
        time.sleep(0.5)


def _assert_stream(node: StreamNode) -> list[dict]:
    lines = node.lines()
    assert lines, "serve wrote nothing to stdout"
    for obj in lines:
        assert {"event", "level", "timestamp"} <= set(obj), f"line without event/level/timestamp: {obj}"
        assert obj["level"] in {"debug", "info", "warning", "error", "critical"}, obj
    foreign = [o for o in lines if "logger" in o]
    for o in foreign:
        assert not o["logger"].startswith("dicom_node"), f"a node event carries a logger key: {o}"
    text = node.out_path.read_text(errors="replace") + node.err_path.read_text(errors="replace")
    for phi in PHI:
        assert phi not in text, f"{phi!r} leaked into the log"
    return lines


def test_serve_stdout_is_one_json_object_per_line_with_duplicates_summarised(tmp_path, storescp):
    files = phantom_series(tmp_path / "in", n_slices=20)
    assert pydicom.dcmread(files[0]).PatientName == PATIENT_NAME
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    closed = free_port()  # nothing listens there: every delivery attempt is refused
    node = StreamNode(tmp_path, destinations=[f"STORESCP@127.0.0.1:{storescp.port}", f"NOBODY@127.0.0.1:{closed}"],
                      **{"retry.max_attempts": 2, "log.level": "INFO"}).start()
    try:
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: node.stdout_has('"series_completed"'), 30, "series_completed logged")
        _broken_peer(node.port)  # refused by the connection guard (dicom_node/network/connection.py)
        # the same study again: every instance is a duplicate; the job failed (one destination refused), so the
        # re-send is the repair (State.duplicate_received): the series is analysed and delivered once more
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: node.stdout_count('"delivery_failed"') >= 2 and node.stdout_count('"association_released"') >= 2,
                   90, "the re-opened job's delivery failed too and the second association released")
    finally:
        node.stop()
    lines = _assert_stream(node)
    events = [o["event"] for o in lines if "logger" not in o]
    assert {"scp_listening", "association_accepted", "series_completed", "results_sent", "delivery_retry",
            "delivery_failed", "job_finished", "association_released"} <= set(events)
    assert [o for o in lines if o["event"] == "results_sent"][0]["destination"].startswith("STORESCP@")
    failed = [o for o in lines if o["event"] == "delivery_failed"]
    assert len(failed) == 2  # the first job and the one the re-send re-opened
    assert all(o["destination"] == f"NOBODY@127.0.0.1:{closed}" and o["attempts"] == 2 for o in failed), failed
    # the broken peer is stopped by the node's connection guard before pynetdicom sees it: one JSON warning
    # with the peer and the reason (no traceback); library lines, if any, are JSON and quiet at INFO
    guard = [o for o in lines if o["event"] in {"connection_closed", "association_rejected", "pdu_refused"}]
    assert guard and all(o["level"] == "warning" and o["peer"].startswith("127.0.0.1") and o["reason"] for o in guard), guard
    assert not any("Traceback" in json.dumps(o) for o in guard), guard
    foreign = [o for o in lines if o.get("logger", "").startswith("pynetdicom")]
    assert all(o["level"] in {"warning", "error", "critical"} for o in foreign), foreign  # quiet at INFO
    # duplicates: one line when the first arrives, one summary with the count when the association ends
    first = [o for o in lines if o["event"] == "instance_duplicate"]
    summary = [o for o in lines if o["event"] == "instances_duplicate"]
    assert len(first) == 1 and first[0]["series_uid"] == series_uid and first[0]["level"] == "info"
    assert first[0]["series_reopened"] is True
    assert len(summary) == 1 and summary[0]["series_uid"] == series_uid and summary[0]["count"] == len(files)
    assert summary[0]["calling_aet"] == "STORESCU"
    assert len(first) + len(summary) < len(files)
    assert events.index("instances_duplicate") < len(events) - 1 - events[::-1].index("association_released")


def test_serve_at_debug_with_the_real_pipeline_keeps_library_lines_json(tmp_path, storescp):
    pytest.importorskip("torch")
    from bundle_factory import build_tiny_bundle
    from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL

    bundle = tmp_path / "bundle" / "tiny"
    build_tiny_bundle(bundle, thresholds={k: 0.5 for k in (WINDOW_LABEL, *STUDY_LABELS)})
    files = phantom_series(tmp_path / "in", n_slices=24, rows=64)
    node = StreamNode(tmp_path, job="dicom_node.pipeline:run_job", destinations=[f"STORESCP@127.0.0.1:{storescp.port}"],
                      **{"log.level": "DEBUG", "inference.bundle": str(bundle),
                         "inference.providers": ["CPUExecutionProvider"]}).start()
    try:
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: node.stdout_has('"job_finished"'), 120, "job_finished logged")
    finally:
        node.stop()
    lines = _assert_stream(node)
    events = {o["event"] for o in lines if "logger" not in o}
    assert {"instance_stored", "series_completed", "results_built", "results_sent", "job_finished"} <= events
    loggers = {o["logger"].split(".")[0] for o in lines if "logger" in o}
    assert {"pynetdicom", "highdicom"} <= loggers, loggers  # at DEBUG both libraries speak, as JSON
    assert (next(o for o in lines if o["event"] == "job_finished"))["state"] == "done"


def _captured(json_mode: bool, level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(json=json_mode, level=level, stream=stream)
    return stream


@pytest.fixture
def restore_logging():
    yield
    configure_logging(json=True, level="INFO", stream=sys.__stderr__)


def test_foreign_lines_are_json_and_never_carry_a_patient_name(restore_logging):
    stream = _captured(True)
    # what highdicom logs when a patient name does not look like a DICOM PN (base.py, SOPClass.__init__)
    logging.getLogger("highdicom.base").warning(f'value of argument "patient_name" is potentially invalid: '
                                                f'"{PATIENT_NAME}"')
    logging.getLogger("highdicom.base").info('copy Patient-related attributes from dataset "1.2.3"')  # quiet
    logging.getLogger("pynetdicom.assoc").info("Requesting Association")  # quiet below DEBUG
    logging.getLogger("some.library").error(f"cannot encode (0010,0020) Patient ID LO: '{PATIENT_ID}'")
    logging.getLogger("some.library").warning(f"odd name {PATIENT_NAME} in header")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    try:
        raise ValueError(f"bad value '{PATIENT_NAME}'")
    except ValueError:
        logging.getLogger("some.library").exception("conversion failed")
    from dicom_node.log import get_logger

    get_logger("dicom_node.test").info("own_event", patient_name=PATIENT_NAME, series_uid="1.2.3")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    text = stream.getvalue()
    for phi in PHI:
        assert phi not in text, f"{phi!r} leaked: {text}"
    by_logger = {o.get("logger"): o for o in lines}
    assert by_logger["highdicom.base"]["level"] == "warning"
    assert by_logger["highdicom.base"]["event"].startswith('value of argument "patient_name"')
    assert "pynetdicom.assoc" not in by_logger and len([o for o in lines if o.get("logger") == "highdicom.base"]) == 1
    assert by_logger["py.warnings"]["level"] == "warning" and "a library warning" in by_logger["py.warnings"]["event"]
    exc = next(o for o in lines if o["event"] == "conversion failed")
    assert exc["level"] == "error" and "ValueError" in exc["exception"]
    own = next(o for o in lines if o["event"] == "own_event")
    assert own["patient_name"] == "[redacted]" and own["series_uid"] == "1.2.3" and "logger" not in own


def test_an_exception_that_ends_a_thread_is_one_json_error_line_without_values(restore_logging):
    stream = _captured(True)

    def crash() -> None:
        raise ValueError(f"cannot convert '{PATIENT_NAME}'")

    t = threading.Thread(target=crash, name="association-test")
    t.start()
    t.join()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (line,) = [o for o in lines if o["event"] == "thread_crashed"]
    assert line["level"] == "error" and line["thread"] == "association-test"
    assert line["error"].startswith("ValueError: cannot convert") and line["where"].endswith(" in crash")
    assert "Traceback" not in stream.getvalue()
    for phi in PHI:
        assert phi not in stream.getvalue()


def test_a_refused_association_request_is_a_warning_so_that_error_alerts_fire_once_per_failed_delivery(
        restore_logging):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    stream = _captured(True)
    ae = AE(ae_title="PENODE")
    ae.add_requested_context(Verification)
    assert not ae.associate("127.0.0.1", free_port(), ae_title="NOBODY").is_established  # nothing listens
    logging.getLogger("pynetdicom.assoc").error("Connection closed while waiting for DIMSE message")  # stays
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [o for o in lines if o.get("logger") == "pynetdicom.transport"]
    assert [o["event"].split(":")[0] for o in failed] == ["Association request failed", "TCP Initialisation Error"]
    assert {o["level"] for o in failed} == {"warning"}
    assert [o["level"] for o in lines if o.get("logger") == "pynetdicom.assoc"] == ["error"]


def test_console_mode_stays_human_readable(restore_logging):
    stream = _captured(False)
    from dicom_node.log import get_logger

    get_logger("dicom_node.test").info("own_event", series_uid="1.2.3")
    logging.getLogger("pynetdicom.assoc").error("DIMSE timeout reached while waiting for message response")
    out = stream.getvalue().splitlines()
    assert len(out) == 2
    assert "own_event" in out[0] and "series_uid=1.2.3" in out[0] and not out[0].startswith("{")
    assert "DIMSE timeout reached" in out[1] and "pynetdicom.assoc" in out[1] and "error" in out[1]
