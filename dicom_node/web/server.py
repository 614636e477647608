"""The node's HTTP port: the ASGI app (`dicom_node.web.app`) served by uvicorn in a thread of the node.

`HttpServer(app, host, port, ...)` binds the port in the constructor (a port in use fails there,
with OSError, before anything else starts), `start()` runs uvicorn's server on its own event loop
in a daemon thread and waits until it serves, `stop()` ends it.

Guarding the DICOM side (issue 22, hostile corpus case 10: 1,100 half-sent HTTP requests used up
the file descriptors of the node process with the old thread-per-connection server, and with them
the SCP). uvicorn closes idle keep-alive connections (`keepalive_s`) and answers 503 above
`limit_concurrency`, but has no limit on connections that never finish their request head. The
protocol class here adds both:

* a request head (request line and headers) must arrive within `header_timeout_s` of the
  connection being made, or of the first byte of the next request on a kept-alive connection;
  otherwise the connection is closed;
* at most `max_connections` are open: one more evicts the oldest connection that is not in the
  middle of a request (still sending its head, or idle between requests); when every connection
  is busy with a request the newcomer is closed instead.

So a flood of slow or half-sent requests costs at most `max_connections` descriptors, each for at
most `header_timeout_s`, while a real request (a login, a scrape) still gets in.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HttpServer", "guarded_protocol"]


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head deadline and a cap on open connections."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _opened_at: float = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened_at = time.monotonic()
            self._arm_head_timer()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                        and c._between_requests()]
                victim = min(idle, key=lambda c: c._opened_at) if idle else self
                victim._close()

        def _between_requests(self) -> bool:
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE:  # the head never completed
                self._close()

        def _close(self) -> None:
            self._disarm_head_timer()
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                self._disarm_head_timer()
            elif self.conn.their_state is h11.IDLE:
                self._arm_head_timer()  # part of a head: the deadline runs from its first byte
            else:
                self._disarm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is not h11.IDLE:
                return
            self._disarm_head_timer()  # idle between requests: uvicorn's keep-alive timeout applies

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol


def _quiet_uvicorn_loggers() -> None:
    """No access log lines and no start/stop chatter in the node's log: paths carry study UIDs and the
    audit log (`dicom_node.web.auth.AuditLog`) is where accesses are recorded. uvicorn decides per
    connection whether to write access lines by whether its logger has handlers, hence `propagate`."""
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate, access.disabled = [], False, True
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


class HttpServer:
    """uvicorn serving `app` on `host:port` in a daemon thread (see the module docstring)."""

    def __init__(self, app: Any, host: str, port: int, *, max_connections: int = 200, header_timeout_s: float = 10.0,
                 keepalive_s: float = 5.0, certfile: str = "", keyfile: str = "") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self.tls = bool(certfile)
        _quiet_uvicorn_loggers()
        config = uvicorn.Config(app, http=guarded_protocol(max_connections, header_timeout_s), lifespan="off",
                                log_config=None, access_log=False, timeout_keep_alive=max(1, round(keepalive_s)),
                                limit_concurrency=max_connections, ws="none",
                                ssl_certfile=certfile or None, ssl_keyfile=keyfile or None,
                                server_header=False, date_header=True)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as e:  # reported by start(); a thread must not die silently
            self._error = e

    def start(self, timeout_s: float = 30.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise OSError(f"the HTTP server on port {self.port} did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise OSError(f"the HTTP server on port {self.port} did not start within {timeout_s:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()
