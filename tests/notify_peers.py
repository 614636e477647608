"""Real notification peers on loopback for the tests: an HTTP server taking webhook POSTs and an
MLLP listener (the `hl7` library's asyncio MLLP server) answering HL7 messages with scripted ACKs.

Both run in a thread, bind 127.0.0.1 on a given or OS-assigned port, record what arrived, and can
be stopped and started again on the same port (a peer that is down and comes back).
"""

from __future__ import annotations

import asyncio
import http.server
import threading
from dataclasses import dataclass, field

import hl7
from hl7.mllp import start_hl7_server

from peers import free_port


@dataclass
class Post:
    path: str
    headers: dict[str, str]  # names lower-cased (HTTP header names are case-insensitive)
    body: bytes


class WebhookListener:
    """`http.server` on 127.0.0.1 recording POSTs; answers the next code of `statuses` (then 200)."""

    def __init__(self, port: int | None = None, statuses: tuple[int, ...] = ()) -> None:
        self.port = port or free_port()
        self.posts: list[Post] = []
        self.statuses = list(statuses)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.received = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookListener:
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                listener.posts.append(Post(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                code = listener.statuses.pop(0) if listener.statuses else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                listener.received.set()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class MllpListener:
    """The `hl7` library's MLLP server on 127.0.0.1. `script`: what to answer to each message in turn
    ("AA", "AE", "AR", "silent": read it, answer nothing, close; "hang": answer nothing, keep the connection
    open until the client closes it); then "AA"."""

    port: int = field(default_factory=free_port)
    script: list[str] = field(default_factory=list)
    messages: list[hl7.Message] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    async def _client(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()  # raises on bad MLLP framing
                self.messages.append(message)
                action = self.script.pop(0) if self.script else "AA"
                self.answered.append(action)
                if action == "silent":
                    break
                if action == "hang":  # keep the connection open without an answer until the client gives up
                    await reader.read()
                    break
                writer.writemessage(message.create_ack(action, application="RIS", facility="TEST"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def start(self) -> MllpListener:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(start_hl7_server(self._client, "127.0.0.1", self.port))
            ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "MLLP listener did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
