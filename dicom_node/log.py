"""structlog set-up shared by every command: one stream of JSON (or console) lines, never PHI.

Events are named for what happened (`series_completed`, `inference_finished`, `store_failed`)
and carry UIDs, AE titles and durations. Patient name, ID and birth date must never be passed;
`redact_phi` drops those keys should a caller pass them by mistake.

One stream for every line: `configure_logging(stream=...)` sends the node's own events and the
stdlib `logging` records of the libraries (pynetdicom, highdicom, pydicom, ...) and Python
`warnings` (`logging.captureWarnings`) through one handler with structlog's `ProcessorFormatter`,
so with `json=True` each line on the stream is one JSON object, whoever wrote it:

* the node's events: `event`, `level`, `timestamp` and their fields (no `logger` key);
* other libraries' records: `event` (the message), `level` (the same names: debug, info, warning,
  error, critical), `timestamp`, `logger` (e.g. `pynetdicom.dul`, `py.warnings`) and, when the
  record has a traceback, `exception` (the traceback text, inside the one line).

`dicom-node serve` passes `sys.stdout`; the default stream is stderr (the other commands keep
stdout for their output). Native libraries that write to the file descriptor themselves
(onnxruntime's C++ logger, kept to errors by `model/inference.py`) and Python's own crash
tracebacks go to stderr, never to stdout.

PHI: `redact_phi` replaces PHI keys, and `scrub_text` is applied to every string value of every
line, so a library message that names a patient attribute (`"patient_name" ...`, `PatientID`,
`Patient's Birth Date`, `(0010,0020)`) keeps only the text up to that name (line by line, for
tracebacks), and a DICOM person name (`Family^Given`) is replaced wherever it appears. Patient
IDs and birth dates without their attribute's name cannot be recognised: never log datasets. The
DICOM libraries and Python warnings (`VALUE_LOGGERS`: pydicom, highdicom, py.warnings) quote the
values they warn about (`Invalid value for VR DA: '19O10203'`, a person name without `^`): in their
lines every quoted value is replaced, at every level. `error_text(e)` does the same for another
library's exception text before it reaches a log line or the state database (`job_failed`).

A failing sink never stops the node: a line that cannot be written (the reader of a pipe gone:
EPIPE, a full disk: ENOSPC, a closed stream) is dropped and counted, not raised into the thread that
logged it, and not reported on stderr (often the same broken pipe). On a pipe or socket the lines go
through a bounded queue and a writer thread: a reader that stops reading (a hung `jq`) fills the
pipe and would block every thread at its next log call while the SCP still acknowledged instances;
instead, lines beyond the queue's 10,000 are dropped and counted. `log_sink_status()` says how many
lines were dropped, the last error and when (shown in `/healthz`).

pynetdicom (one line per PDU at INFO) and highdicom (one line per copied module at INFO) are
kept to warnings unless the level is DEBUG.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import stat
import sys
import threading
import time
from typing import TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = ["configure_logging", "get_logger", "PHI_KEYS", "redact_phi", "scrub_text", "scrub_values", "error_text",
           "log_sink_status", "VALUE_LOGGERS"]

#: keys that must never reach a log line
PHI_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id",
    "patient_birth_date", "OtherPatientIDs", "OtherPatientNames",
})

#: libraries that are chatty at INFO: warnings and above unless the level is DEBUG
QUIET_LIBRARIES = ("pynetdicom", "highdicom")

#: what pynetdicom logs at ERROR when an association the node requested (a delivery, `send`, `echo`) is not
#: established. The node's own lines carry the verdict (`delivery_retry` warning, `delivery_failed` error
#: once the attempts are used up), so these are logged as warnings: an alert on level == error must fire
#: once per failed delivery, not at every retry.
REQUEST_FAILURE_LINES = ("Association request failed", "TCP Initialisation Error", "Association Rejected",
                         "Result: Rejected", "Reason: ", "No accepted presentation contexts", "Association Aborted",
                         "ACSE timeout reached while waiting for response to association request",
                         "Received an invalid A-ASSOCIATE response", "Aborting Association")

_REDACTED = "[redacted]"

#: loggers whose messages quote field values (pydicom: "Invalid value for VR DA: '19O10203'"; highdicom's
#: person-name warning quotes the whole name, caret or not): every quoted value is replaced
VALUE_LOGGERS = ("py.warnings", "pydicom", "highdicom")
# a quoted value: '...' or "..." on one line (an apostrophe inside a word, as in "Patient's", is no quote)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_QUOTED = re.compile(r"(?<![\w])'[^'\n]*'(?![\w])" r'|"[^"\n]*"')

# a mention of a patient-identity attribute: keyword, name with spaces, snake case or tag number
_PHI_MENTION = re.compile(
    r"(?:other[ _]?)?patient(?:'s)?[ _]?(?:name|id|birth[ _]?date)s?(?![a-z])"
    r"|\(0010,\s*(?:0010|0020|0030|1000|1001)\)|\b0010(?:0010|0020|0030|1000|1001)\b",
    re.IGNORECASE,
)
# a DICOM person name value (PN): components joined by '^', quoted or as one token
_PERSON_NAME = re.compile(r"""(["'])[^"'\n]*\^[^"'\n]*\1|[\w.-]+\^[\w.^-]*""")


def _scrub_line(line: str) -> str:
    m = _PHI_MENTION.search(line)
    if m:
        end = m.end()
        while end < len(line) and line[end] in "\"'":
            end += 1  # keep the quote that closes the attribute's name
        if line[end:].strip():
            line = f"{line[:end]} {_REDACTED}"
    return line


def scrub_text(text: str) -> str:
    """`text` without patient identity: each line cut after a patient-attribute mention, PN values replaced."""
    if "\n" in text:  # a traceback or a dataset dump: line by line, so one mention does not hide the rest
        text = "\n".join(_scrub_line(line) for line in text.split("\n"))
    else:
        text = _scrub_line(text)
    return _PERSON_NAME.sub(_REDACTED, text)


def _quoted(m: re.Match[str]) -> str:
    inner = m.group(0)[1:-1]
    if _NAME.fullmatch(inner) and ("_" in inner or _is_keyword(inner)):
        return m.group(0)  # an argument or attribute name ("patient_name", 'PatientBirthDate'), not a value
    return _REDACTED


def _is_keyword(word: str) -> bool:
    from pydicom.datadict import keyword_dict

    return word in keyword_dict


def scrub_values(text: str) -> str:
    """`text` with every quoted value ('...' or "...") replaced: what libraries quote is a field's value.
    Quoted names are kept: snake_case argument names and DICOM keywords (a person's name is neither)."""
    return _QUOTED.sub(_quoted, text)


def error_text(e: BaseException, limit: int = 500) -> str:
    """`Type: message` of an exception, for a log line or the state database, without field values.

    The node's own errors (`dicom_node.*` types) say the value and the fix on purpose and never name
    patient values; other libraries' messages (`ValueError: Unable to convert '1950' to 'DA' object`)
    quote the value they choke on, which may be a birth date or a name: quoted values are replaced."""
    text = f"{type(e).__name__}: {e}"
    if not type(e).__module__.startswith("dicom_node"):
        text = scrub_values(text)
    return scrub_text(text)[:limit]


def redact_phi(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace PHI keys; scrub patient identity from every string value (library messages included), and
    quoted values from the messages of the DICOM libraries and of Python warnings (`VALUE_LOGGERS`)."""
    if str(event_dict.get("logger", "")).startswith(VALUE_LOGGERS) and isinstance(event_dict.get("event"), str):
        event_dict["event"] = scrub_values(event_dict["event"])
    for key, value in list(event_dict.items()):
        if key in PHI_KEYS:
            event_dict[key] = _REDACTED
        elif isinstance(value, str) and key != "timestamp":
            event_dict[key] = scrub_text(value)
    return event_dict


def _demote_request_failures(record: logging.LogRecord) -> bool:
    """ERROR -> WARNING for pynetdicom's lines about an association request that failed (`REQUEST_FAILURE_LINES`)."""
    if (record.levelno == logging.ERROR and record.name in ("pynetdicom.transport", "pynetdicom.acse")
            and str(record.msg).startswith(REQUEST_FAILURE_LINES)):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


class _SinkHandler(logging.StreamHandler):
    """The one handler: a line that cannot be written is dropped and counted, never raised or reported on
    stderr; on a pipe or socket, lines are written by a writer thread through a bounded queue, so a
    reader that stops reading (a hung `jq`: the pipe fills, write() blocks) never blocks the thread
    that logs. Regular files and terminals are written at once (they do not block; their lines are
    in the file when the call returns, which the tests rely on)."""

    QUEUE_LINES = 10_000
    #: class-wide: the counts survive a reconfiguration (SIGHUP)
    dropped = 0
    last_error: str | None = None
    last_error_at: float | None = None

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._queue: queue.Queue[str | None] | None = None
        if _may_block(stream):
            self._queue = queue.Queue(self.QUEUE_LINES)
            threading.Thread(target=self._write_queued, name="log-writer", daemon=True).start()
            atexit.register(self._drain, 2.0)

    @classmethod
    def _count(cls, err: BaseException | None) -> None:
        cls.dropped += 1
        cls.last_error = f"{type(err).__name__}: {err}"[:200] if err else "unknown"
        cls.last_error_at = time.time()

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self._count(sys.exc_info()[1])

    def emit(self, record: logging.LogRecord) -> None:
        if self._queue is None:
            super().emit(record)
            return
        try:
            self._queue.put_nowait(self.format(record) + self.terminator)
        except queue.Full:
            self._count(BlockingIOError(f"log stream not read: {self.QUEUE_LINES} lines already waiting"))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        if self._queue is None:
            super().flush()
        # queued: the writer flushes each line itself; a flush from here (logging.shutdown at exit) would
        # wait forever on a pipe whose reader hangs, and the node would not exit on SIGTERM

    def _write_queued(self) -> None:
        q = self._queue
        assert q is not None
        while (line := q.get()) is not None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except Exception as e:  # EPIPE, ENOSPC, a closed stream: the line is lost, the node goes on
                self._count(e)
            finally:
                q.task_done()
        q.task_done()

    def _drain(self, timeout_s: float) -> None:
        """Give the writer up to `timeout_s` to write what is queued (at exit, on reconfiguration)."""
        q = self._queue
        if q is None:
            return
        deadline = time.monotonic() + timeout_s
        while q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        if self._queue is not None:
            self._drain(1.0)
            try:
                self._queue.put_nowait(None)  # the writer ends after the lines before it
            except queue.Full:
                pass
            atexit.unregister(self._drain)
        super().close()


def _may_block(stream: TextIO) -> bool:
    """True for a pipe or socket (a reader that stops reading blocks write()); False for files and terminals."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # no descriptor (a StringIO): written in place
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def log_sink_status() -> dict[str, object]:
    """Lines the log stream could not take since start: {"dropped": n, "last_error": ..., "last_error_at": ...}."""
    return {"dropped": _SinkHandler.dropped, "last_error": _SinkHandler.last_error,
            "last_error_at": _SinkHandler.last_error_at}


def configure_logging(*, json: bool = False, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging (pynetdicom, highdicom, warnings) for one process.

    Every line of either goes to `stream` (default stderr) through one handler, rendered the same
    way: JSON objects with `json=True`, human-readable console lines otherwise.
    """
    stream = stream or sys.stderr
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Processor = (structlog.processors.JSONRenderer() if json
                           else structlog.dev.ConsoleRenderer(colors=False))
    handler = _SinkHandler(stream)
    handler.addFilter(_demote_request_failures)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # records of other libraries: level and time as for ours, plus the logger's name
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, redact_phi],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    logging.basicConfig(level=lvl, handlers=[handler], force=True)
    # warnings.warn(...) -> logger "py.warnings", level warning. Off then on: captureWarnings(True) does
    # nothing when an earlier configuration turned it on, even if warnings.showwarning was put back since
    # (warnings.catch_warnings does that, e.g. around every test of a test runner).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    threading.excepthook = _log_thread_exception
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            redact_phi,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread (pynetdicom's association threads, a server's): one `thread_crashed`
    line at ERROR with the thread, the error (`error_text`: no field values) and where it was raised (file,
    line and function, no locals), instead of Python's plain traceback on stderr, which bypasses the log
    sink, its JSON form and its PHI redaction. SystemExit ends a thread quietly, as by default."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    tb = args.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}" if tb else "?"
    get_logger("dicom_node.thread").error(
        "thread_crashed", thread=args.thread.name if args.thread else "?", error=error_text(args.exc_value),
        where=where, note="the thread has ended; /healthz names the node's own threads that stopped")


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
