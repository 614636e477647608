"""The node's HTTP port: the ASGI app (`dicom_node.web.app`) served by uvicorn in a thread of the node.

`HttpServer(app, host, port, ...)` binds the port in the constructor (a port in use fails there,
with OSError, before anything else starts), `start()` runs uvicorn's server on its own event loop
in a daemon thread and waits until it serves, `stop()` ends it.

Guarding the DICOM side (issue 22, hostile corpus case 10: 1,100 half-sent HTTP requests used up
the file descriptors of the node process with the old thread-per-connection server, and with them
the SCP). uvicorn closes idle keep-alive connections (`keepalive_s`) and answers 503 above
`limit_concurrency`, but has no limit on connections that never finish their request head, and
asyncio accepts whatever the kernel has queued. Two additions:

* a whole request (request line, headers and body) must arrive within `read_timeout_s` of the
  connection being made, or of the first byte of the next request on a kept-alive connection;
  otherwise the connection is closed (`GuardedH11Protocol`): neither a half-sent head nor a
  trickled body holds a connection longer;
* at most `max_connections` are open. The cap is kept where every connection passes, the
  listening socket's `accept` (`_CappedListener`): at the cap, the oldest connection that is not
  in the middle of a request (still sending its head, or idle between requests) is closed to make
  room; when every open connection is busy with a request the newcomer is closed instead.
  Connections the kernel has queued but not handed over cost no descriptor.

So a flood of slow or half-sent requests holds at most about `max_connections` descriptors (plus
the closes of one accept batch, which take effect a loop turn later), each for at most
`read_timeout_s`, and a real request (a login, a scrape) still gets in.
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


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request; registers itself with its listener."""

    read_timeout_s = 10.0
    listener: _CappedListener | None = None
    _read_timer: asyncio.TimerHandle | None = None
    _opened_at = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened_at = time.monotonic()
        self._arm_read_timer()
        if self.listener is not None:
            self.listener.protocols[transport.get_extra_info("socket").fileno()] = self

    def between_requests(self) -> bool:
        """Not in the middle of a request: still sending its head, or idle after a response."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def closing(self) -> bool:
        return self.transport.is_closing()

    def close_now(self) -> None:
        self._disarm_read_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def _arm_read_timer(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timeout)

    def _disarm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _reading(self) -> bool:
        """The client is still sending a request: its head (IDLE until the head is complete) or its body."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self._reading():  # the request never arrived whole
            self.close_now()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm_read_timer()
        elif self._reading():
            self._arm_read_timer()  # part of a request: the deadline runs from its first byte
        else:
            self._disarm_read_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._disarm_read_timer()  # idle between requests: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        if self.listener is not None:
            self.listener.forget(self)
        super().connection_lost(exc)


def guarded_protocol(listener: _CappedListener | None, read_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class for one server: its listener and its head deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"listener": listener, "read_timeout_s": read_timeout_s})


class _CappedListener(socket.socket):
    """A listening socket whose `accept` keeps at most `cap` connections open (module docstring).

    Runs in the event loop's thread (asyncio calls `accept` there), as do the protocols' callbacks,
    so `protocols` needs no lock."""

    def __init__(self, family: int, cap: int) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.cap = cap
        self.open: dict[int, socket.socket] = {}  # fd -> accepted socket, until it is closed
        self.protocols: dict[int, GuardedH11Protocol] = {}  # fd -> its protocol, once connection_made ran

    def forget(self, protocol: GuardedH11Protocol) -> None:
        for fd, p in list(self.protocols.items()):
            if p is protocol:
                del self.protocols[fd]

    def accept(self) -> tuple[socket.socket, Any]:
        conn, addr = super().accept()
        self.open = {fd: s for fd, s in self.open.items() if s.fileno() == fd}
        if sum(1 for fd in self.open if not (fd in self.protocols and self.protocols[fd].closing())) >= self.cap:
            idle = [p for p in self.protocols.values() if not p.closing() and p.between_requests()]
            if not idle:  # every connection is busy with a request: the newcomer waits its turn elsewhere
                conn.close()
                raise BlockingIOError("connection cap reached")  # asyncio's accept loop stops for this turn
            min(idle, key=lambda p: p._opened_at).close_now()
        self.open[conn.fileno()] = conn
        return conn, addr


def _accept_batch(max_connections: int) -> int:
    """asyncio accepts up to `backlog` connections in one loop turn; evictions close a turn later."""
    return max(4, min(64, max_connections // 4))


def _quiet_uvicorn_loggers() -> None:
    """No access log lines and no start/stop chatter in the node's log: paths carry study UIDs and the
    audit log (`dicom_node.web.auth.AuditLog`) is where accesses are recorded. uvicorn decides per
    connection whether to write access lines by whether its logger has handlers, hence `propagate`."""
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate, access.disabled = [], False, True
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


class HttpServer:
    """uvicorn serving `app` on `host:port` in a daemon thread (see the module docstring)."""

    def __init__(self, app: Any, host: str, port: int, *, max_connections: int = 200, read_timeout_s: float = 10.0,
                 keepalive_s: float = 5.0, certfile: str = "", keyfile: str = "",
                 trusted_proxies: tuple[str, ...] = ()) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = _CappedListener(family, max_connections)
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
        batch = _accept_batch(max_connections)
        config = uvicorn.Config(app, http=guarded_protocol(sock, read_timeout_s), lifespan="off",
                                log_config=None, access_log=False, timeout_keep_alive=max(1, round(keepalive_s)),
                                # uvicorn's own limit (503 above it) counts every open connection; the cap
                                # above keeps them fewer, so it is only the backstop
                                limit_concurrency=max_connections + 2 * batch + 1, ws="none", backlog=batch,
                                ssl_certfile=certfile or None, ssl_keyfile=keyfile or None,
                                server_header=False, date_header=True,
                                # X-Forwarded-For only from the configured proxies: uvicorn's default believes
                                # it from 127.0.0.1, where any local process could name any client
                                proxy_headers=bool(trusted_proxies),
                                forwarded_allow_ips=list(trusted_proxies) if trusted_proxies else None)
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
        # asyncio listened with the accept batch as the queue length; a longer kernel queue costs no
        # descriptor (queued connections are not accepted yet) and spares a burst of clients SYN retries
        self._sock.listen(1024)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()
