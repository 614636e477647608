"""Between accept() and a negotiated association: what a connection must do before it costs anything.

pynetdicom runs the TLS handshake in its accept loop without a deadline (one idle TCP connection to
a TLS port froze the listener), counts every open connection against `max_associations` (eleven
bare connects refused real senders), and reads any PDU its header announces into memory (a
P-DATA-TF claiming 1 GiB, an A-ASSOCIATE-RQ claiming 4 GiB). `GuardedServer` replaces its
per-connection request handler and socket wrapper with ones that, in this order:

1. cap the connections open from one address (`max_connections_per_address`; over it the
   connection is closed at once, `connection_refused`);
2. turn Nagle's algorithm off (a C-STORE-RSP is one small PDU; waiting for the peer's delayed ACK
   would add ~40 ms per instance);
3. run the TLS handshake in the connection's own thread, within `timeouts.associate_s` of
   accept (`tls_handshake_failed`, one line with the peer address and the reason);
4. read the first PDU within the same deadline, before any association thread exists: it must be an
   A-ASSOCIATE-RQ of at most `MAX_ASSOCIATE_RQ` bytes whose called and calling AE titles hold only
   the default character repertoire (a trailing tab is refused with an A-ASSOCIATE-RJ, not
   stripped). Anything else is closed with an A-ABORT (`connection_closed`). Only then does
   pynetdicom see the connection, so only requested associations count against `max_associations`;
5. during the association, check each PDU header before reading its body: a P-DATA-TF longer than
   the maximum PDU the node announced (`max_pdu`), any other PDU longer than its kind can be, or a
   data set longer than `max_instance_mb` ends the association with an A-ABORT (`pdu_refused`)
   without buffering it; a PDU must arrive whole within `timeouts.network_s`.

Receive speed (benchmarks/receive.py): pynetdicom's two threads per association poll with 1 ms
sleeps (the DUL thread between socket checks, the association thread between message checks), which
put up to three waits of ~1 ms on every C-STORE's path. `_quicken` replaces the sleeps by waits that
end when there is work: the DUL thread waits in `select` on the socket and on a wake-up socket pair
written when a primitive is queued for sending, the association thread waits on its message queue.
The loops still come round at least every `_IDLE_WAIT_S` to check timers, releases and aborts. The
socket wrapper reads each PDU with `recv_into` straight into one buffer (pynetdicom reads 4 KiB at a
time). Once the association is established, the DUL thread's readiness check reads each P-DATA-TF
itself and gives it to `dicom_node.network.fast_store` (C-STOREs to a file and answered without
pynetdicom's DIMSE layer); what that path does not take is queued for pynetdicom's `recv` unchanged.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.config import Config
from dicom_node.log import get_logger
from dicom_node.network.fast_store import PDV_HEADER, FastStore, FlushFn, StoreFn, data_set_too_long

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = ["ConnectionLimits", "GuardedServer", "GuardedSocket", "MAX_ASSOCIATE_RQ", "ae_title_problem"]

#: an A-ASSOCIATE-RQ longer than this is refused before it is read: 128 presentation contexts with
#: 16 transfer syntaxes each and a 32 KiB user identity (a SAML assertion, a Kerberos ticket) fit.
MAX_ASSOCIATE_RQ = 256 * 1024
#: the longest A-ASSOCIATE-AC/RJ, A-RELEASE-RQ/RP or A-ABORT an acceptor accepts (those are 4 bytes; an
#: AC or RJ sent to an acceptor is a protocol error pynetdicom answers, it need not be large for that)
_MAX_OTHER_PDU = 64 * 1024
_PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ",
              6: "A-RELEASE-RP", 7: "A-ABORT"}
_REUSED_BODY = 256 * 1024  # P-DATA-TF bodies up to this are read into one buffer per association (dcmtk sends 128 KiB)
_IDLE_WAIT_S = 0.02  # longest wait of an idle reactor loop: timers, releases and aborts are seen within it
_HEADER = struct.Struct(">BBL")


def _abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with `reason` (PS3.8 9.3.8; 0 = not specified,
    2 = unexpected PDU, 6 = invalid PDU parameter value)."""
    return _HEADER.pack(7, 0, 4) + bytes((0, 0, 2, reason))


def _reject_pdu(reason: int) -> bytes:
    """A-ASSOCIATE-RJ, rejected-permanent by the service user (PS3.8 9.3.4): 2 = calling AE title
    not recognized, 7 = called AE title not recognized."""
    return _HEADER.pack(3, 0, 4) + bytes((0, 1, 1, reason))


def ae_title_problem(raw: bytes) -> str | None:
    """Why a 16-byte AE title field of an A-ASSOCIATE-RQ is not one, or None when it is.

    PS3.5 6.2: the default character repertoire without backslash or control characters; leading
    and trailing spaces are padding. A tab is a control character, not padding."""
    if not raw.strip(b" "):
        return "is all spaces"
    bad = [b for b in raw if b < 0x20 or b > 0x7E or b == 0x5C]
    if bad:
        return f"holds byte 0x{bad[0]:02X} (control characters and backslash are not allowed in an AE title)"
    return None


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may cost, from `Config`."""

    associate_s: float  # accept -> complete A-ASSOCIATE-RQ, TLS handshake included
    pdu_s: float  # one PDU, first header byte to last body byte
    max_pdu: int  # longest P-DATA-TF accepted (the maximum the node announced); 0 = unlimited
    max_instance_bytes: int  # longest data set of one DIMSE message
    per_address: int  # connections open at once from one address

    @classmethod
    def from_config(cls, c: Config) -> ConnectionLimits:
        return cls(associate_s=c.timeouts.associate_s, pdu_s=c.timeouts.network_s, max_pdu=c.max_pdu,
                   max_instance_bytes=c.max_instance_mb * 2**20, per_address=c.max_connections_per_address)


class _Closed(Exception):
    """The peer closed, timed out or sent something refused; the message is the log reason."""

    def __init__(self, reason: str, *, answer: bytes = b"", quiet: bool = False) -> None:
        super().__init__(reason)
        self.answer = answer  # PDU sent before closing (A-ABORT or A-ASSOCIATE-RJ)
        self.quiet = quiet  # nothing at all was sent: a TCP probe, logged at debug level only


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    """`n` bytes from `sock` by `deadline` (monotonic), or _Closed naming `what` was being read."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Closed(f"{what} incomplete after the deadline ({got} of {n} bytes)")
        sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise _Closed(f"{what} incomplete after the deadline ({got} of {n} bytes)") from None
        except OSError as e:
            raise _Closed(f"connection failed while reading the {what}: {e}") from None
        if k == 0:
            raise _Closed(f"connection closed by the peer during the {what} ({got} of {n} bytes)")
        got += k
    return bytes(buf)


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket wrapper with the A-ASSOCIATE-RQ already read (`prefix`) and PDU limits.

    pynetdicom's reactor reads a PDU as `recv(6)` (the header) then `recv(length)`; the header is
    checked here before the body is read."""

    _prefix: bytearray
    _limits: ConnectionLimits
    _peer: str
    _guard: GuardedServer
    _body: tuple[int, int] | None  # (type, length) of the PDU whose header was read last
    _refused: str | None
    _dataset_bytes: int
    _pdu_deadline: float  # monotonic time by which the PDU being read must be complete
    _fast: FastStore | None  # the node's C-STORE path, when `fast_store` is on
    _body_view: memoryview | None  # on that path, P-DATA-TF bodies up to _REUSED_BODY bytes are read into it

    @classmethod
    def adopt(cls, plain: AssociationSocket, *, prefix: bytes, guard: GuardedServer, peer: str) -> GuardedSocket:
        """Take over `plain` (made by pynetdicom for the association, its connection event already queued)."""
        s = cls.__new__(cls)
        s.__dict__.update(plain.__dict__)
        s._prefix, s._limits, s._guard, s._peer = bytearray(prefix), guard.limits, guard, peer
        s._body, s._refused, s._dataset_bytes, s._wake, s._pdu_deadline = None, None, 0, None, 0.0
        s._fast = None
        s._body_view = None
        return s

    _wake: tuple[socket.socket, socket.socket] | None  # (read end, write end), see _quicken

    @property
    def ready(self) -> bool:
        """True when a PDU can be read; waits up to `_IDLE_WAIT_S` for one (or for the wake-up socket)
        when pynetdicom's DUL has nothing else queued."""
        if self._prefix:
            return True
        sock = self.socket
        if sock is None or not self._is_connected:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return self._fast_or_ready()
        busy = self._wake is None or not self.event_queue.empty()
        watch = [sock] if self._wake is None else [sock, self._wake[0]]
        try:
            readable, _, _ = select.select(watch, [], [], 0 if busy else _IDLE_WAIT_S)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom's own check: the connection is gone
            return False
        if self._wake is not None and self._wake[0] in readable:
            try:
                self._wake[0].recv(4096)
            except OSError:
                pass
        return sock in readable and self._fast_or_ready()

    def _fast_or_ready(self) -> bool:
        """Data is waiting: read it on the node's C-STORE path when that is on, else let pynetdicom."""
        if self._fast is None or self._refused or not self._assoc.is_established:
            return True
        return self._read_fast()

    def _read_fast(self) -> bool:
        """Read the next PDU here; a P-DATA-TF goes to the node's C-STORE path (`fast_store`), and what
        that hands on, or any other PDU, is queued for pynetdicom's `recv` (then True: ready)."""
        assert self._fast is not None
        while True:
            deadline = time.monotonic() + self._limits.pdu_s
            head = self._read(6, deadline)
            if len(head) < 6:
                return True  # as a short body below
            pdu_type, _, length = _HEADER.unpack(head)
            if pdu_type != 4 or (self._limits.max_pdu and length > self._limits.max_pdu):
                self._prefix += head  # pynetdicom reads (or recv refuses) the rest as before
                return True
            if length > _REUSED_BODY:
                body: bytearray | memoryview = self._read(length, deadline)
                got = len(body)
            else:  # read into the association's buffer: no new 128 KiB zeroed per PDU
                if self._body_view is None:
                    self._body_view = memoryview(bytearray(_REUSED_BODY))
                body = self._body_view[:length]
                got = self._read_into(body, length, deadline)
            if got < length or self._refused:
                return True  # refused past the deadline, or the peer closed: pynetdicom's recv sees the end
            rest = self._fast.take(body)
            if rest is not None:
                self._prefix += _HEADER.pack(4, 0, len(rest)) + rest
                return True
            self._assoc.dul._idle_timer.restart()  # as pynetdicom does for a PDU it read
            if self._refused:
                return True  # refused: let pynetdicom's recv see the connection end
            if self._fast.message is None or not self._waiting_now():
                return False
            # The next PDU of this data set is already here: read it now rather than going round the
            # reactor's loop (its queue checks, a sleep(0) that hands the GIL round, a select per PDU;
            # docs/benchmarks.md, fifth session)

    def _waiting_now(self) -> bool:
        """Whether bytes can be read without waiting."""
        sock = self.socket
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def enable_fast_store(self, store: StoreFn, flush: FlushFn | None = None) -> None:
        """Serve C-STOREs on the node's own path (`dicom_node.network.fast_store`) once established."""
        self._fast = FastStore(self._assoc, store, self._send_now, self._refuse, self._limits.max_instance_bytes,
                               count=self._guard.count, flush=flush)

    def _send_now(self, data: bytes) -> None:
        """Send from the DUL thread (the one thread that sends on this socket), as pynetdicom's `send`."""
        sock = self.socket
        try:
            assert sock is not None
            sock.settimeout(self._limits.pdu_s)
            sock.sendall(data)
        except (OSError, ValueError, AssertionError):
            self.event_queue.put("Evt17")

    def discard_fast(self) -> None:
        """Drop the node's C-STORE in progress, if any (the association ended mid-message)."""
        if self._fast is not None:
            self._fast.discard()

    def close_wake(self) -> None:
        """Close the wake-up socket pair (when the association's thread ends)."""
        if self._wake is not None:
            for end in self._wake:
                end.close()

    def _read(self, n: int, deadline: float) -> bytearray:
        """Up to `n` bytes (fewer only when the peer closes or the PDU deadline passes)."""
        buf = bytearray(n)
        with memoryview(buf) as view:
            got = self._read_into(view, n, deadline)
        if got < n:
            del buf[got:]
        return buf

    def _read_into(self, view: memoryview, n: int, deadline: float) -> int:
        """`_read` into `view`; returns how many bytes came."""
        got = min(n, len(self._prefix))
        if got:
            view[:got] = self._prefix[:got]
            del self._prefix[:got]
        sock = self.socket
        while got < n and sock is not None:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                k = sock.recv_into(view[got:], n - got)
            except TimeoutError:
                self._refuse(f"PDU incomplete {self._limits.pdu_s:g} s after it began (timeouts.network_s)", 0)
                break
            except (OSError, ValueError):
                break
            if k == 0:
                break
            got += k
        return got

    def recv(self, nr_bytes: int) -> bytearray:
        if self._refused:
            return bytearray()
        if self._body is None:  # a PDU header: the whole PDU must follow within pdu_s of it
            self._pdu_deadline = time.monotonic() + self._limits.pdu_s
            head = self._read(nr_bytes, self._pdu_deadline)
            if nr_bytes == 6 and len(head) == 6:
                pdu_type, _, length = _HEADER.unpack(head)
                if pdu_type in _PDU_NAMES:  # pynetdicom reads no body after an unknown type
                    self._body = (pdu_type, length)
                    self._check_header(pdu_type, length)
            return head
        pdu_type, length = self._body
        self._body = None
        if self._refused:  # the header was refused: do not read the body
            return bytearray()
        body = self._read(nr_bytes, self._pdu_deadline)
        if pdu_type == 4 and len(body) == nr_bytes:
            self._count_dataset(body)
        return bytearray() if self._refused else body

    def _check_header(self, pdu_type: int, length: int) -> None:
        lim = self._limits
        name = _PDU_NAMES[pdu_type]
        if pdu_type == 4:
            if lim.max_pdu and length > lim.max_pdu:
                self._refuse(f"P-DATA-TF of {length} bytes is longer than the maximum PDU {lim.max_pdu} the node "
                             "announced (max_pdu)", 6)
        elif pdu_type == 1:
            if length > MAX_ASSOCIATE_RQ:
                self._refuse(f"A-ASSOCIATE-RQ of {length} bytes is longer than {MAX_ASSOCIATE_RQ}", 6)
        elif length > _MAX_OTHER_PDU:
            self._refuse(f"{name} of {length} bytes is longer than {_MAX_OTHER_PDU}", 6)

    def _count_dataset(self, body: bytearray) -> None:
        """Add this P-DATA-TF's data set fragments to the current message; refuse past the cap."""
        pos, end = 0, len(body)
        while pos + 6 <= end:
            item_len, _, control = PDV_HEADER.unpack_from(body, pos)
            if control & 1:  # a command fragment: a new message; its data set follows the last one
                if control & 2:
                    self._dataset_bytes = 0
            else:
                self._dataset_bytes += max(0, item_len - 2)
                if self._dataset_bytes > self._limits.max_instance_bytes:
                    self._refuse(data_set_too_long(self._limits.max_instance_bytes), 0)
                    return
                if control & 2:
                    self._dataset_bytes = 0
            pos += 4 + item_len

    def _refuse(self, reason: str, abort_reason: int) -> None:
        """End the association: one log line, an A-ABORT to the peer, and short reads from now on
        (pynetdicom treats a short PDU as the connection closing)."""
        if self._refused:
            return
        self._refused = reason
        self._guard.log.warning("pdu_refused", peer=self._peer, reason=reason)
        self._guard.count("pdu_refused")
        sock = self.socket
        if sock is not None:
            try:
                sock.settimeout(1.0)
                sock.sendall(_abort_pdu(abort_reason))
            except (OSError, ValueError):
                pass


class _WakingQueue(queue.Queue[Any]):
    """The DUL's queue of primitives to send: a put also wakes the DUL thread from its `select`."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake_w = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (the DUL is awake anyway) or closed (the association is over)
            pass


class _WaitingQueue(queue.Queue[Any]):
    """The association's queue of received DIMSE messages: its reactor polls it with
    `get(block=False)` after a 1 ms sleep; waiting here instead serves a message the moment the DUL
    thread completes it."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return super().get(True, _IDLE_WAIT_S)
        return super().get(block, timeout)


def _quicken(assoc: Association, sock: GuardedSocket) -> None:
    """Replace pynetdicom's polling sleeps on this association's path by waits for work (module docstring).

    Done before the association's threads start; pynetdicom 3.0's DUL sleeps `_run_loop_delay` when
    idle (now 0: it waits in GuardedSocket.ready instead) and reads the queues replaced here only
    through the Queue interface."""
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    sock._wake = (r, w)
    assoc.dul._run_loop_delay = 0
    assoc.dul.to_provider_queue = _WakingQueue(w)
    assoc.dimse.msg_queue = _WaitingQueue()


class _Handler(RequestHandler):
    """One accepted connection, in its own thread (socketserver's ThreadingMixIn)."""

    server: GuardedServer

    def handle(self) -> None:
        g = self.server
        peer = str(self.client_address[0])
        sock: socket.socket = self.request
        if not g.admit(peer):
            g.log.warning("connection_refused", peer=peer, reason=f"{g.limits.per_address} connections from this "
                          "address are open (max_connections_per_address)")
            g.count("connection_refused")
            _close(sock)
            return
        handed_over = False
        try:
            deadline = time.monotonic() + g.limits.associate_s
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if g.tls is not None:
                sock = self._handshake(sock, peer, deadline)
            first = self._associate_rq(sock, peer, deadline)
            if first is None:
                return
            sock.settimeout(g.limits.pdu_s)
            self.request = sock
            assoc = self._create_association()
            plain = assoc.dul.socket
            assert plain is not None  # _create_association always sets it
            guarded = GuardedSocket.adopt(plain, prefix=first, guard=g, peer=peer)
            assoc.dul.socket = guarded
            _quicken(assoc, guarded)
            if g.store is not None:
                guarded.enable_fast_store(g.store, g.flush)

            def ended() -> None:
                guarded.close_wake()
                guarded.discard_fast()
                _discard_partial_dataset(assoc)
                g.release(peer)

            _release_when_done(assoc, ended)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            handed_over = True
        except _Closed:
            pass
        except Exception as e:  # noqa: BLE001  # one line per refused connection, never a traceback
            g.log.warning("connection_closed", peer=peer, reason=f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            if not handed_over:
                _close(sock)
                g.release(peer)

    def _handshake(self, sock: socket.socket, peer: str, deadline: float) -> socket.socket:
        g = self.server
        assert g.tls is not None
        tls = g.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls.settimeout(max(0.001, deadline - time.monotonic()))
            tls.do_handshake()
        except ssl.SSLEOFError:  # connected and closed: a TCP probe or a port scan, not a handshake failure
            g.log.debug("connection_closed", peer=peer, reason="closed by the peer during the TLS handshake")
            _close(tls)
            raise _Closed("closed during the TLS handshake") from None
        except (OSError, ValueError) as e:  # ssl.SSLError and TimeoutError are OSErrors
            reason = (f"no TLS handshake within {g.limits.associate_s:g} s (timeouts.associate_s)"
                      if isinstance(e, TimeoutError) else f"{type(e).__name__}: {str(e)[:200]}")
            g.log.warning("tls_handshake_failed", peer=peer, reason=reason)
            g.count("tls_handshake_failed")
            _close(tls)
            raise _Closed(reason) from None
        return tls

    def _associate_rq(self, sock: socket.socket, peer: str, deadline: float) -> bytes | None:
        """The first PDU, checked; None (answered, logged and to be closed) when it is refused."""
        g = self.server
        try:
            head = _recv_exact(sock, 6, deadline, "A-ASSOCIATE-RQ header")
        except _Closed as e:
            if "closed by the peer" in str(e) and "(0 of 6 bytes)" in str(e):  # a TCP probe or a port scan
                g.log.debug("connection_closed", peer=peer, reason=str(e))
                return None
            self._refused(sock, peer, _Closed(str(e), answer=_abort_pdu(0)))
            return None
        pdu_type, _, length = _HEADER.unpack(head)
        try:
            if pdu_type != 1:
                raise _Closed(f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ", answer=_abort_pdu(2))
            if length > MAX_ASSOCIATE_RQ or length < 68:
                raise _Closed(f"A-ASSOCIATE-RQ claims {length} bytes; expected 68-{MAX_ASSOCIATE_RQ}",
                              answer=_abort_pdu(6))
            body = _recv_exact(sock, length, deadline, "A-ASSOCIATE-RQ")
            for field, (start, reason) in (("called", (4, 7)), ("calling", (20, 2))):
                problem = ae_title_problem(body[start:start + 16])
                if problem:
                    g.log.warning("association_rejected", peer=peer, reason=f"{field} AE title "
                                  f"{body[start:start + 16].decode('ascii', 'backslashreplace')!r} {problem}")
                    g.count(f"{field}_aet_invalid")
                    _send(sock, _reject_pdu(reason))
                    return None
        except _Closed as e:
            self._refused(sock, peer, e)
            return None
        return head + body

    def _refused(self, sock: socket.socket, peer: str, e: _Closed) -> None:
        g = self.server
        g.log.warning("connection_closed", peer=peer, reason=str(e))
        g.count("connection_closed")
        if e.answer:
            _send(sock, e.answer)


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except (OSError, ValueError):
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
    sock.close()


def _discard_partial_dataset(assoc: Association) -> None:
    """Delete the file of a C-STORE data set the association ended in the middle of (aborted, refused,
    connection lost): pynetdicom deletes a received data set's file after the handler, and a message
    that never completed reaches no handler. Its message in progress is `dimse.message` (3.0)."""
    partial = getattr(getattr(assoc.dimse, "message", None), "_data_set_file", None)
    if partial is None:
        return
    try:
        partial.close()
        os.unlink(partial.name)
    except OSError:
        pass


def _release_when_done(assoc: Association, release: Callable[[], None]) -> None:
    """Call `release` when the association's thread ends, however it ends."""
    run = assoc.run

    def run_then_release() -> None:
        try:
            run()
        finally:
            release()

    assoc.run = run_then_release  # type: ignore[method-assign]


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with `_Handler` per connection (see the module docstring).

    `tls` is the server TLS context (None for plain TCP); the listening socket itself never wraps."""

    daemon_threads = True  # a connection still inside its deadline must not hold up stop()
    # socketserver's default backlog of 5 makes the 6th simultaneous connect wait for a SYN retransmit
    # (1 s): a burst of probes would delay a real sender that much
    request_queue_size = 128

    def __init__(self, *args: Any, limits: ConnectionLimits, tls: ssl.SSLContext | None,
                 on_refused: Callable[[str], None] | None = None, store: StoreFn | None = None,
                 flush: FlushFn | None = None, **kwargs: Any) -> None:
        self.limits = limits
        self.store = store  # the C-STORE decision for the node's own path; None = pynetdicom's path only
        self.flush = flush  # starts a received file's fsync before the decision (`Spool.start_flush`)
        self.tls = tls
        self.on_refused = on_refused
        self.log = get_logger("dicom_node.network.connection")
        self._open: dict[str, int] = {}
        self._open_lock = threading.Lock()
        super().__init__(*args, **{**kwargs, "request_handler": _Handler})

    def admit(self, peer: str) -> bool:
        with self._open_lock:
            n = self._open.get(peer, 0)
            if n >= self.limits.per_address:
                return False
            self._open[peer] = n + 1
            return True

    def release(self, peer: str) -> None:
        with self._open_lock:
            n = self._open.get(peer, 0) - 1
            if n > 0:
                self._open[peer] = n
            else:
                self._open.pop(peer, None)

    def open_connections(self) -> int:
        with self._open_lock:
            return sum(self._open.values())

    def count(self, reason: str) -> None:
        if self.on_refused:
            self.on_refused(reason)

