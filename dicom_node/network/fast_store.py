"""C-STORE on the node's own DIMSE path: each data set fragment straight to a file, the response without pydicom.

pynetdicom spends more CPU per C-STORE than the node's whole decision (docs/benchmarks.md, "Receive
throughput"): it decodes every P-DATA-TF into objects, decodes the command set and writes the file meta
with pydicom, queues the message to the association's thread, and encodes the C-STORE-RSP with pydicom.
A `FastStore` serves one association in its DUL thread (`connection.GuardedSocket` hands it each
P-DATA-TF body once the association is established) and does the same work directly:

* a P-DATA-TF whose first value is a whole command set (one fragment) that is a C-STORE-RQ with a data
  set, on an accepted storage context, with plain UIDs (digits and dots, at most 64) starts a message:
  the command set is read here (implicit VR little endian, group 0000);
* the Part 10 preamble and file meta (the fields pynetdicom writes) and each data set fragment are
  written to a file in the temporary folder (`incoming/` under `dicom-node serve`) as they arrive. (Measured and
  left out: writing in a writer thread while the DUL thread reads on, and starting the kernel's
  write-back per fragment with `sync_file_range`: on 2 cores both cost more CPU than they saved
  flush time, docs/benchmarks.md);
* on the last fragment the file's fsync is started (`flush`, `Spool.start_flush`) so that it runs while
  the receiver's `store` (the one C-STORE decision, `Receiver.store`) decides, and the C-STORE-RSP
  (status, message ID, the SOP class and instance) is encoded here and sent;
* then, in the sender's turn, the file is removed when it was not adopted, and the next message's file
  is made (the association's spare, removed when the association ends).

Everything else goes to pynetdicom exactly as it came: a C-ECHO, a command set split over fragments or
PDUs (and that message's data set), any other message, and a fragment that does not belong to the message
in progress (then the values from it on are handed on as one P-DATA-TF, and the partial message is
dropped). The data set size cap (`max_instance_mb`) is enforced while writing. `fast_store = false`
in the configuration leaves every message to pynetdicom.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_node.durability.flush import Flushing
from dicom_node.log import get_logger

__all__ = ["FastStore", "FlushFn", "PDV_HEADER", "StoreFn", "data_set_too_long", "parse_command_set", "store_response_pdu",
           "file_meta"]

class StoreFn(Protocol):
    """Receiver.store: (association, received file, SOP class, SOP instance, context's abstract syntax,
    context's transfer syntax, the file's fsync under way) -> status."""

    def __call__(self, assoc: Any, received: Path, sop_class: str, sop_uid_rq: str, context_class: str,
                 transfer_syntax: str, flushed: Flushing | None = None) -> int: ...


#: Spool.start_flush: the open received file's descriptor -> its fsync, under way
FlushFn = Callable[[int], Flushing]

#: a presentation data value item's header: item length, presentation context ID, message control header
PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, value length
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_VERIFICATION = "1.2.840.10008.1.1"
_PLAIN_UID = re.compile(rb"[0-9.]{1,64}")
_C_STORE_RQ, _C_STORE_RSP, _NO_DATA_SET = 0x0001, 0x8001, 0x0101
_HANDLER_FAILED = 0xC211  # pynetdicom's status when a C-STORE handler raises
_names = itertools.count()
_log = get_logger("dicom_node.network.fast_store")


def _new_file() -> tuple[Path, int]:
    path = Path(f"{tempfile.gettempdir()}/fs-{os.getpid()}-{next(_names)}-{secrets.token_hex(4)}.dcm")
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)


def data_set_too_long(max_bytes: int) -> str:
    """The refusal reason for a data set past `max_bytes` (`max_instance_mb`), on either receive path."""
    return f"data set longer than {max_bytes // 2**20} MiB (max_instance_mb)"


def parse_command_set(data: bytes | memoryview) -> dict[int, bytes] | None:
    """The elements of a command set (group 0000, implicit VR LE) by element number, or None when it
    is not one (an element running past the end, another group)."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            return None
        out[element] = bytes(data[pos:pos + length])
        pos += length
    return out


def _uid(value: bytes) -> bytes:
    return value + b"\0" if len(value) % 2 else value


def store_response_pdu(context_id: int, message_id: int, sop_class: bytes, sop_instance: bytes, status: int) -> bytes:
    """A P-DATA-TF holding one C-STORE-RSP command set (PS3.7 9.3.1.2), as one last command fragment."""
    body = b"".join((
        _ELEMENT.pack(0, 0x0002, len(_uid(sop_class))), _uid(sop_class),
        _ELEMENT.pack(0, 0x0100, 2), _US.pack(_C_STORE_RSP),
        _ELEMENT.pack(0, 0x0120, 2), _US.pack(message_id),
        _ELEMENT.pack(0, 0x0800, 2), _US.pack(_NO_DATA_SET),
        _ELEMENT.pack(0, 0x0900, 2), _US.pack(status),
        _ELEMENT.pack(0, 0x1000, len(_uid(sop_instance))), _uid(sop_instance),
    ))
    command = _ELEMENT.pack(0, 0x0000, 4) + _UL.pack(len(body)) + body
    return struct.pack(">BBLL", 4, 0, 4 + 2 + len(command), 2 + len(command)) + bytes((context_id, 0x03)) + command


def file_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: str) -> bytes:
    """Preamble, `DICM` and the File Meta Information group as pynetdicom writes it for a received data set."""

    def element(number: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sxxL", 2, number, vr, len(value)) + value
        if len(value) % 2:
            value += b"\0" if vr == b"UI" else b" "
        return struct.pack("<HH2sH", 2, number, vr, len(value)) + value

    body = b"".join((
        element(0x0001, b"OB", b"\x00\x01"),
        element(0x0002, b"UI", sop_class),
        element(0x0003, b"UI", sop_instance),
        element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii")),
        element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
    ))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body)) + body


@dataclass
class _Message:
    """The C-STORE being received: its request's fields and the file its data set is written to."""

    context_id: int
    message_id: int
    sop_class: bytes
    sop_instance: bytes
    abstract_syntax: str
    transfer_syntax: str
    path: Path
    fd: int
    size: int = 0  # data set bytes received
    write_error: OSError | None = None  # a fragment could not be written: the rest is read and dropped, answered 0xA701


class FastStore:
    """One association's C-STORE path (module docstring). Used only from that association's DUL thread.

    Parameters
    ----------
    assoc
        The pynetdicom Association (its accepted presentation contexts; passed on to `store`).
    store
        The C-STORE decision (`Receiver.store`).
    send
        Sends bytes on the association's socket (the C-STORE-RSP).
    refuse
        Ends the association with an A-ABORT and one log line (`GuardedSocket._refuse`): a data set
        past `max_bytes`.
    max_bytes
        The longest data set of one message.
    count
        Counts a refusal by reason (the node's metrics), for refusals made here rather than in `store`.
    flush
        Starts the received file's fsync when its last fragment is written (`Spool.start_flush`), so that
        the flush runs while `store` checks the data set; its future goes to `store` as `flushed`.
    """

    def __init__(self, assoc: Any, store: StoreFn, send: Callable[[bytes], None],
                 refuse: Callable[[str, int], None], max_bytes: int,
                 count: Callable[[str], None] = lambda reason: None, flush: FlushFn | None = None) -> None:
        self.assoc, self.store, self.send, self.refuse, self.max_bytes = assoc, store, send, refuse, max_bytes
        self.count, self.flush = count, flush
        self.message: _Message | None = None
        self._spare: tuple[Path, int] | None = None  # the next message's file, made while the sender takes its turn
        self._command_open = False  # a command set handed to pynetdicom is still arriving in fragments
        self._lock = threading.Lock()

    def take(self, body: bytearray | memoryview) -> bytes | None:
        """Handle one P-DATA-TF body. None: all of it was handled here; otherwise the P-DATA-TF body
        (the whole one, or its values from the first one not handled here) to hand to pynetdicom."""
        with self._lock:  # the association's end (another thread) discards under the same lock
            return self._take(body)

    def _take(self, body: bytearray | memoryview) -> bytes | None:
        view = memoryview(body)
        pos, end = 0, len(body)
        while pos + 6 <= end:
            item_len, context_id, control = PDV_HEADER.unpack_from(view, pos)
            if item_len < 2 or pos + 4 + item_len > end:
                break  # malformed: pynetdicom answers it
            data = view[pos + 6:pos + 4 + item_len]
            if control & 1:  # a command fragment
                if self.message is not None:  # a new message before the data set ended: drop that one
                    self._drop()
                if self._command_open or control & 2 == 0 or not self._begin(context_id, data):
                    return self._hand_on(view, pos)
            elif self.message is None or context_id != self.message.context_id:
                self._drop()
                return self._hand_on(view, pos)
            elif not self._write(data, last=bool(control & 2)):
                return None  # refused: the association is being aborted
            pos += 4 + item_len
        if pos != end:
            self._drop()
            return self._hand_on(view, pos)
        return None

    def _hand_on(self, view: memoryview, pos: int) -> bytes:
        """Values from `pos` on, for pynetdicom; notes whether they leave a command set incomplete."""
        rest = bytes(view[pos:])
        p, end = 0, len(rest)
        while p + 6 <= end:
            item_len, _, control = PDV_HEADER.unpack_from(rest, p)
            if control & 1:
                self._command_open = not control & 2
            p += 4 + max(item_len, 2)
        return rest

    def _begin(self, context_id: int, data: memoryview) -> bool:
        """Start a message for this whole command set when it is a C-STORE-RQ this path takes."""
        cs = parse_command_set(data)
        if cs is None or _US.unpack(cs.get(0x0100, b"\0\0")[:2])[0] != _C_STORE_RQ:
            return False
        if len(cs.get(0x0800, b"")) != 2 or _US.unpack(cs[0x0800])[0] == _NO_DATA_SET or len(cs.get(0x0110, b"")) != 2:
            return False
        sop_class, sop_instance = cs.get(0x0002, b"").rstrip(b"\0 "), cs.get(0x1000, b"").rstrip(b"\0 ")
        if not (_PLAIN_UID.fullmatch(sop_class) and _PLAIN_UID.fullmatch(sop_instance)):
            return False
        cx = getattr(self.assoc, "_accepted_cx", {}).get(context_id)
        if cx is None or not cx.transfer_syntax or str(cx.abstract_syntax) == _VERIFICATION:
            return False
        ts = str(cx.transfer_syntax[0])
        try:
            path, fd = self._spare or _new_file()
        except OSError:
            return False  # pynetdicom's path tries (and answers) it
        self._spare = None
        self.message = m = _Message(context_id, _US.unpack(cs[0x0110])[0], sop_class, sop_instance,
                                    str(cx.abstract_syntax), ts, path, fd)
        self._append(m, file_meta(sop_class, sop_instance, ts))
        return True

    def _append(self, m: _Message, data: bytes | memoryview) -> None:
        if m.write_error is not None:
            return
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.write(m.fd, view[done:])
        except OSError as e:  # a full disk: keep the association, refuse this instance when it has arrived
            m.write_error = e

    def _write(self, data: memoryview, *, last: bool) -> bool:
        """Append a data set fragment; on the last one decide and answer. False when refused."""
        m = self.message
        assert m is not None
        m.size += len(data)
        if m.size > self.max_bytes:
            self._drop()
            self.refuse(data_set_too_long(self.max_bytes), 0)
            return False
        self._append(m, data)
        if last:
            self.message = None
            try:
                try:
                    flushed = self.flush(m.fd) if self.flush is not None and m.write_error is None else None
                finally:
                    os.close(m.fd)
                if m.write_error is not None:
                    raise m.write_error
                status = self.store(self.assoc, m.path, m.sop_class.decode(), m.sop_instance.decode(),
                                    m.abstract_syntax, m.transfer_syntax, flushed=flushed)
            except OSError as e:
                from dicom_node.network.receive import STATUS  # the statuses' one home (it imports this module)

                status = STATUS["write_failed"]
                _log.warning("store_refused", sop_instance_uid=m.sop_instance.decode(), status=f"0x{status:04X}",
                             reason=f"writing the received data set failed: {e}")
                self.count("write_failed")
            except Exception as e:  # noqa: BLE001  # as pynetdicom answers a failing handler: not acknowledged
                _log.error("store_failed", sop_instance_uid=m.sop_instance.decode(), status="0xC211",
                           reason=f"{type(e).__name__}: {str(e)[:200]}")
                status = _HANDLER_FAILED
            try:
                self.send(store_response_pdu(m.context_id, m.message_id, m.sop_class, m.sop_instance, status))
            finally:
                # What the sender's turn (response -> next request) leaves time for, off the answer's path:
                # removing the file when it was not adopted (refused, a duplicate, an ignored class), and
                # making the next message's file (a new inode: ~0.1 ms)
                m.path.unlink(missing_ok=True)
                self._make_spare()
        return True

    def _make_spare(self) -> None:
        if self._spare is None:
            try:
                self._spare = _new_file()
            except OSError:
                pass  # made when the next message begins, or pynetdicom's path answers it

    def discard(self) -> None:
        """Drop the message in progress (its file too) and the spare file: the association ended."""
        with self._lock:
            self._drop()
            spare, self._spare = self._spare, None
            if spare is not None:
                _close_and_remove(spare[1], spare[0])

    def _drop(self) -> None:
        m, self.message = self.message, None
        if m is not None:
            _close_and_remove(m.fd, m.path)



def _close_and_remove(fd: int, path: Path) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    path.unlink(missing_ok=True)
