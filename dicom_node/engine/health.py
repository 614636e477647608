"""Liveness of the node's own threads, for `/healthz` (`Node.health`, served by the metrics/web server).

Contract: `thread_liveness(loops)` takes the node's background loops (completion, worker dispatch,
sender, notifier, retention: each a `BackgroundLoop` with a `thread_name`) and returns `(ok, reasons)`:
`ok` is False, and `reasons` has one line naming the thread and the fix, for every loop whose thread
was started and is no longer alive. A loop never started, or asked to stop, is not a fault.

Why it is needed: these threads are daemons that nothing joins while the node runs, so one that dies
(an exception escaping its loop) would leave the SCP acknowledging instances that nobody completes,
analyses or delivers, with `/healthz` still 200. `BackgroundLoop` already restarts a loop whose body
raised (`loop_restarted`); this check catches what is left: a thread that ended all the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.engine.background import BackgroundLoop

__all__ = ["thread_liveness"]


def thread_liveness(loops: Iterable[BackgroundLoop]) -> tuple[bool, list[str]]:
    """(ok, reasons): one reason per started, not stopping loop whose thread is dead (module docstring)."""
    reasons = []
    for loop in loops:
        if loop.started and not loop.stopping and not loop.alive:
            why = f" (last error: {loop.last_error})" if loop.last_error else ""
            reasons.append(f"thread {loop.thread_name} is not running{why}; its work is not being done: "
                           "restart the node (dicom-node serve) and report the log lines before this")
    return not reasons, reasons
