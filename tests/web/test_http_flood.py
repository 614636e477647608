"""Issue 22, hostile corpus case 10: the HTTP port must not take DICOM down. With the old
thread-per-connection server, 1,100 half-sent HTTP requests held 1,100 descriptors and the node
process ran out of them. Here a real `dicom-node serve` process, its open-file limit lowered to 400
(well below the flood), gets 1,100 connections that each send half a request head and stop; while
they are held open, a C-ECHO and a worklist login still work, and the server closes the half-sent
ones after `[web] read_timeout_s`."""

from __future__ import annotations

import resource
import socket
import subprocess
import time

from nodekit import NodeProcess, wait_until
from peers import free_port, needs_dcmtk, wait_for_port
from webkit import WebClient, web_config

FLOOD = 1100


def _c_echo(port: int) -> None:
    """dcmtk echoscu in its own process: this test process holds 1,100 sockets, and descriptors above
    1024 are out of range for the select() that pynetdicom's client uses."""
    r = subprocess.run(["/usr/bin/echoscu", "-aet", "FLOODTEST", "-aec", "PENODE", "127.0.0.1", str(port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr


def _half_sent(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /worklist HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow")  # the head never ends
    return s


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the server counts as closed too
        return True


@needs_dcmtk
def test_a_flood_of_half_sent_http_requests_leaves_c_echo_and_login_working(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD + 1000), hard))
    http = free_port()
    node = NodeProcess(tmp_path, **web_config(http, **{"web.read_timeout_s": 3.0, "web.max_connections": 100})).start()
    held: list[socket.socket] = []
    try:
        wait_for_port(http, timeout=30)
        resource.prlimit(node.proc.pid, resource.RLIMIT_NOFILE, (400, 400))  # the flood is 2.75 times this
        held = [_half_sent(http) for _ in range(FLOOD)]
        _c_echo(node.port)
        c = WebClient(http)
        assert c.login("alice").status == 303
        assert c.get("/worklist").status == 200  # served while the flood is still connected
        t0 = time.monotonic()
        open_ones = list(held)

        def all_closed() -> bool:
            open_ones[:] = [s for s in open_ones if not _closed_by_server(s)]
            return not open_ones

        wait_until(all_closed, 30, "half-sent connections closed by the node")
        assert time.monotonic() - t0 < 15
        assert node.proc.poll() is None  # the node is alive
        _c_echo(node.port)
        text = node.log_path.read_text()
        assert "Too many open files" not in text and "EMFILE" not in text
    finally:
        for s in held:
            s.close()
        node.stop()


def test_a_head_trickled_byte_by_byte_and_a_body_that_never_ends_are_both_cut_off_at_the_read_deadline(make_node):
    http = free_port()
    make_node([], **web_config(http, **{"web.read_timeout_s": 1.5}))
    head = socket.create_connection(("127.0.0.1", http), timeout=10)
    body = socket.create_connection(("127.0.0.1", http), timeout=10)
    body.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: 1000\r\n\r\nusername=al")
    t0 = time.monotonic()
    closed: dict[str, float] = {}
    try:
        for i, byte in enumerate(b"GET /worklist HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 200):
            if time.monotonic() - t0 > 8:
                break
            try:
                head.sendall(bytes([byte]))  # a byte every 50 ms: never idle, never done
            except OSError:
                closed.setdefault("head", time.monotonic() - t0)
                break
            if "body" not in closed and _closed_by_server(body):
                closed["body"] = time.monotonic() - t0
            if i % 4 == 0 and "head" not in closed and _closed_by_server(head):
                closed["head"] = time.monotonic() - t0
                break
            time.sleep(0.05)
        wait_until(lambda: "body" in closed or (_closed_by_server(body) and closed.setdefault("body", time.monotonic() - t0)),
                   10, "body connection closed")
    finally:
        head.close()
        body.close()
    assert 1.3 <= closed["head"] <= 4.0 and 1.3 <= closed["body"] <= 4.0, closed
