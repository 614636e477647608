"""structlog set-up shared by every command: JSON or console events, never PHI.

Events are named for what happened (`series_completed`, `inference_finished`, `store_failed`)
and carry UIDs, AE titles and durations. Patient name, ID and birth date must never be passed;
`redact_phi` drops those keys should a caller pass them by mistake.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

__all__ = ["configure_logging", "get_logger", "PHI_KEYS"]

#: keys that must never reach a log line
PHI_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id",
    "patient_birth_date", "OtherPatientIDs", "OtherPatientNames",
})


def redact_phi(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key in list(event_dict):
        if key in PHI_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(*, json: bool = False, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure structlog (and stdlib logging, used by pynetdicom) for one process."""
    stream = stream or sys.stderr
    lvl = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=lvl, stream=stream, format="%(message)s", force=True)
    # pynetdicom is chatty at INFO (every PDU); keep it to warnings unless debugging.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_phi,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()
