"""The node's background loops (completion scheduler, worker dispatch, sender) share one shape.

A `BackgroundLoop` runs `_run()` on a named daemon thread until `stop()`; `wake()` cuts a wait
short so new work is picked up at once instead of at the next poll.

A loop never dies of an exception: each subclass catches what its poll raises, and should anything
escape `_run` all the same (an error inside that handling), the thread logs `loop_restarted` (if
the log still works), waits `restart_delay_s` and runs `_run` again; `last_error` keeps what
happened. `started`, `stopping` and `alive` are what `dicom_node.engine.health.thread_liveness`
reads for `/healthz`.
"""

from __future__ import annotations

import threading

from dicom_node.log import get_logger

__all__ = ["BackgroundLoop"]


class BackgroundLoop:
    thread_name = "background"
    join_timeout_s = 10.0
    restart_delay_s = 1.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.restarts = 0

    def wake(self, _job_id: int | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervised, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(self.join_timeout_s)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _supervised(self) -> None:
        """`_run` until stopped; an exception escaping it restarts it (module docstring)."""
        while not self._stop.is_set():
            try:
                self._run()
                return
            except Exception as e:
                self.restarts += 1
                self.last_error = f"{type(e).__name__}: {str(e)[:300]}"
                try:
                    get_logger("dicom_node.engine.background").error(
                        "loop_restarted", thread=self.thread_name, error=self.last_error, restarts=self.restarts)
                except Exception:  # the log itself may be what failed: keep the thread, lose the line
                    pass
                self._stop.wait(self.restart_delay_s)

    def _sleep(self, seconds: float) -> None:
        """Wait up to `seconds`, or until `wake()`/`stop()`."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:  # pragma: no cover - every subclass defines its loop
        raise NotImplementedError
