"""The node's background loops (completion scheduler, worker dispatch, sender) share one shape.

A `BackgroundLoop` runs `_run()` on a named daemon thread until `stop()`; `wake()` cuts a wait
short so new work is picked up at once instead of at the next poll.
"""

from __future__ import annotations

import threading

__all__ = ["BackgroundLoop"]


class BackgroundLoop:
    thread_name = "background"
    join_timeout_s = 10.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self, _job_id: int | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(self.join_timeout_s)

    def _sleep(self, seconds: float) -> None:
        """Wait up to `seconds`, or until `wake()`/`stop()`."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:  # pragma: no cover - every subclass defines its loop
        raise NotImplementedError
