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
IDs and birth dates without their attribute's name cannot be recognised: never log datasets.

pynetdicom (one line per PDU at INFO) and highdicom (one line per copied module at INFO) are
kept to warnings unless the level is DEBUG.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = ["configure_logging", "get_logger", "PHI_KEYS", "redact_phi", "scrub_text"]

#: keys that must never reach a log line
PHI_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id",
    "patient_birth_date", "OtherPatientIDs", "OtherPatientNames",
})

#: libraries that are chatty at INFO: warnings and above unless the level is DEBUG
QUIET_LIBRARIES = ("pynetdicom", "highdicom")

_REDACTED = "[redacted]"

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


def redact_phi(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace PHI keys; scrub patient identity from every string value (library messages included)."""
    for key, value in list(event_dict.items()):
        if key in PHI_KEYS:
            event_dict[key] = _REDACTED
        elif isinstance(value, str) and key != "timestamp":
            event_dict[key] = scrub_text(value)
    return event_dict


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
    handler = logging.StreamHandler(stream)
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


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
