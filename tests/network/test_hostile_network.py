"""A hostile corpus against a real node process (issue 22, corpus cases 1, 2, 5 and the AE-title and
TLS-logging parts of 11): raw sockets and real associations on loopback.

`CORPUS` is the fixture: each `HostileCase` attacks the node, checks the answer it must get, and then
`Hostile.assert_unharmed` checks what must hold after every case: the process is alive, a C-ECHO and
a dcmtk storescu of a real instance still succeed, its file descriptors are back near where they
started, its peak resident memory stayed within 150 MB of its size at start (nothing a case sends is
buffered whole), nothing was written outside its data folder (its working directory, TMPDIR and HOME
are empty folders watched here), nothing is left in `incoming/` and no refused instance reached the
spool. The last test sends a good study and waits for its result in a real Orthanc. The TLS cases
run against a second node with mutual TLS.
"""

from __future__ import annotations

import copy
import io
import os
import random
import socket
import ssl
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import uid as U
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from nodekit import NodeProcess, incoming_empties, phantom_series, storescu, wait_until
from peers import ORTHANC_BIN, OrthancPeer
from pki import self_signed

pytestmark = [pytest.mark.dcmtk, pytest.mark.skipif(ORTHANC_BIN is None, reason="Orthanc not installed")]

ASSOCIATE_S = 1.5  # timeouts.associate_s of the nodes under attack
NETWORK_S = 3.0  # timeouts.network_s: idle associations and slow PDUs
MAX_INSTANCE_MB = 8
MAX_ASSOCIATIONS = 4
PER_ADDRESS = 24
MEMORY_MARGIN = 150 * 2**20


# --- raw protocol pieces ----------------------------------------------------------------------------
def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: bytes = b"HOSTILE", called: bytes = b"PENODE",
                 abstract: str = Verification, ts: str = U.ImplicitVRLittleEndian) -> bytes:
    """An A-ASSOCIATE-RQ built byte by byte (PS3.8 9.3.2), AE title fields taken as given (space padded)."""
    pc = _item(0x20, bytes((1, 0, 0, 0)) + _item(0x30, abstract.encode()) + _item(0x40, ts.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.22"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user)
    return struct.pack(">BBL", 1, 0, len(body)) + body


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """(type, body) of the next PDU, or None when the node closed the connection."""
    sock.settimeout(timeout)
    head = b""
    while len(head) < 6:
        try:
            chunk = sock.recv(6 - len(head))
        except (ConnectionResetError, TimeoutError):
            return None
        if not chunk:
            return None
        head += chunk
    kind, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return kind, body


def closed_by_node(sock: socket.socket, within: float) -> bool:
    """True when the node closes `sock` (EOF or reset, after any PDU it sends) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def raw_store(port: int, payload: bytes, *, context: str, affected: str, sop_uid: str,
              ts: str = U.ExplicitVRLittleEndian) -> int | None:
    """Send `payload` as the data set of one C-STORE on a `context` presentation context naming
    `affected`; the response status, or None when the node aborted the association."""
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(context, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="PENODE")
    assert assoc.is_established
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = affected, sop_uid
    req.DataSet = io.BytesIO(payload)
    # below pynetdicom's send_c_store, which re-encodes a Dataset and picks the context by its class:
    # pause the requestor's reactor as send_c_store does, so the response comes to get_msg here
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if assoc.is_established:
        assoc.release()
    return int(rsp.Status) if rsp is not None else None


def echo(port: int, tls_args=None) -> int | None:
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PENODE", tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


# --- the node under attack --------------------------------------------------------------------------
def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@dataclass
class Hostile:
    node: NodeProcess
    outside: Path
    good: Path  # one real CT instance, stored once at start: every later send of it is a duplicate
    template: pydicom.Dataset  # a CT data set the cases change
    rss_start: int
    fds_start: int

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def pid(self) -> int:
        return self.node.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def sockets(self) -> int:
        fd = Path(f"/proc/{self.pid}/fd")
        return sum(1 for f in fd.iterdir() if os.readlink(f).startswith("socket:"))

    def spooled(self) -> int:
        return sum(1 for _ in (self.node.workdir / "data" / "spool").rglob("*.dcm"))

    def dataset(self, **changes) -> pydicom.Dataset:
        ds = copy.deepcopy(self.template)  # Dataset.copy() shares its elements
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        for k, v in changes.items():
            setattr(ds, k, v)
        return ds

    def assert_unharmed(self, spooled_before: int) -> None:
        assert self.node.proc.poll() is None, "the node process died"
        assert echo(self.port) == 0
        r = storescu(self.port, [self.good], timeout=60)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: self.fds() <= self.fds_start + 8, 15, f"file descriptors back near {self.fds_start}")
        peak = _proc_status(self.pid, "VmHWM")
        assert peak - self.rss_start < MEMORY_MARGIN, f"peak RSS {peak >> 20} MiB, {self.rss_start >> 20} MiB at start"
        written = [p for p in self.outside.rglob("*") if p.is_file()]
        assert not written, f"the node wrote outside its data folder: {written}"
        incoming_empties(self.node.workdir / "data" / "incoming")
        assert self.spooled() == spooled_before, "a refused instance reached the spool"


def _start(work: Path, outside: Path, **cfg) -> NodeProcess:
    for d in ("cwd", "tmp", "home"):
        (outside / d).mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(work, cwd=outside / "cwd", env={"TMPDIR": str(outside / "tmp"), "HOME": str(outside / "home")},
                       **{"timeouts.associate_s": ASSOCIATE_S, "timeouts.network_s": NETWORK_S,
                          "max_instance_mb": MAX_INSTANCE_MB,
                          "max_associations": MAX_ASSOCIATIONS, "max_connections_per_address": PER_ADDRESS, **cfg})
    return node.start()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc")).start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, orthanc):
    work = tmp_path_factory.mktemp("hostile")
    files = phantom_series(work / "in", seed=22, n_slices=8)
    node = _start(work / "node", work / "outside", destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
                  quiet=0.6)
    try:
        r = storescu(node.port, files[:1])
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        time.sleep(1.0)  # let the first job (one instance) run: its imports are part of the baseline
        yield Hostile(node, work / "outside", files[0], pydicom.dcmread(files[1]),
                      _proc_status(node.proc.pid, "VmRSS"), len(os.listdir(f"/proc/{node.proc.pid}/fd")))
    finally:
        node.stop()


# --- the corpus -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostileCase:
    name: str
    what: str
    run: Callable[[Hostile], None]


def _many_then_real_sender(h: Hostile, open_one: Callable[[], socket.socket], *, held: bool) -> None:
    socks = [open_one() for _ in range(11)]
    try:
        if held:  # a real sender gets through while all eleven are still open
            assert echo(h.port) == 0
            r = storescu(h.port, [h.good], timeout=30)
            assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
            assert all(closed_by_node(s, ASSOCIATE_S + 3) for s in socks), "not closed after timeouts.associate_s"
    finally:
        for s in socks:
            s.close()


def bare_connect_close(h: Hostile) -> None:
    for _ in range(11):
        connect(h.port).close()
    assert echo(h.port) == 0


def random_bytes(h: Hostile) -> None:
    rng = random.Random(22)

    def one() -> socket.socket:
        s = connect(h.port)
        s.sendall(bytes([rng.choice((0x04, 0x07, 0x33, 0xFF))]) + rng.randbytes(200))
        return s

    socks = [one() for _ in range(11)]
    assert echo(h.port) == 0
    for s in socks:  # each is answered with an A-ABORT (or closed) at once, not held
        pdu = read_pdu(s, ASSOCIATE_S + 3)
        assert pdu is None or pdu[0] == 0x07
        s.close()


def slow_drip(h: Hostile) -> None:
    rq = associate_rq()

    def one() -> socket.socket:
        s = connect(h.port)
        s.sendall(rq[:7])  # a load balancer's probe or a slowloris: the rest trickles, too late
        return s

    _many_then_real_sender(h, one, held=True)


def idle_connections(h: Hostile) -> None:
    _many_then_real_sender(h, lambda: connect(h.port), held=True)


def per_address_cap(h: Hostile) -> None:
    wait_until(lambda: h.sockets() <= 1, 10, "the earlier cases' connections closed")  # the listening socket
    socks = [connect(h.port) for _ in range(PER_ADDRESS + 1)]
    try:  # one of them (the one whose thread counted last) is closed at once, the others wait for their deadline
        deadline = time.monotonic() + ASSOCIATE_S - 0.3
        closed: set[socket.socket] = set()
        while time.monotonic() < deadline and not closed:
            closed = {s for s in socks if closed_by_node(s, 0.01)}
        assert len(closed) == 1, f"{len(closed)} of {len(socks)} connections closed before timeouts.associate_s"
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: echo(h.port) == 0, 10, "C-ECHO once the idle connections are gone")


def associate_rq_claims_4_gib(h: Hostile) -> None:
    s = connect(h.port)
    s.sendall(struct.pack(">BBL", 1, 0, 0xFFFFFFF0))
    try:
        s.sendall(bytes(4 * 2**20))  # may fail: the node closes without reading
    except (BrokenPipeError, ConnectionResetError):
        pass
    pdu = read_pdu(s)
    assert pdu is None or pdu[0] == 0x07
    s.close()


def _associated(h: Hostile) -> socket.socket:
    s = connect(h.port)
    s.sendall(associate_rq())
    pdu = read_pdu(s)
    assert pdu is not None and pdu[0] == 0x02, f"expected an A-ASSOCIATE-AC, got {pdu and pdu[0]}"
    return s


def pdata_claims_1_gib(h: Hostile) -> None:
    s = _associated(h)
    s.sendall(struct.pack(">BBL", 4, 0, 2**30))
    try:
        for _ in range(16):
            s.sendall(bytes(2**20))
    except (BrokenPipeError, ConnectionResetError):
        pass
    pdu = read_pdu(s)
    assert pdu is None or pdu[0] == 0x07
    assert closed_by_node(s, 5)
    s.close()


def pdata_slow_drip(h: Hostile) -> None:
    s = _associated(h)
    s.sendall(struct.pack(">BBL", 4, 0, 1000))
    t0 = time.monotonic()
    # one byte every 0.5 s: each arrives in time, the PDU never does; the PDU deadline (or pynetdicom's
    # idle timer, whichever fires first: both are timeouts.network_s) ends the association
    for _ in range(int(NETWORK_S * 2) + 4):
        try:
            s.sendall(b"\0")
        except (BrokenPipeError, ConnectionResetError):
            break
        if closed_by_node(s, 0.5):
            break
    elapsed = time.monotonic() - t0
    s.close()
    assert elapsed < NETWORK_S + 2, f"a PDU trickling in was held {elapsed:.1f} s"


def _rejected_for_ae(h: Hostile, rq: bytes, reason: int) -> None:
    s = connect(h.port)
    s.sendall(rq)
    pdu = read_pdu(s)
    s.close()
    assert pdu is not None and pdu[0] == 0x03, f"expected an A-ASSOCIATE-RJ, got {pdu}"
    assert pdu[1][1:] == bytes((1, 1, reason))  # rejected-permanent, service user, AE title not recognized


def calling_ae_trailing_tab(h: Hostile) -> None:
    _rejected_for_ae(h, associate_rq(calling=b"STORESCU\t"), 2)


def called_ae_control_character(h: Hostile) -> None:
    _rejected_for_ae(h, associate_rq(called=b"PENODE\x1b"), 7)


def deflate_bomb(h: Hostile) -> None:
    ds = h.dataset(Rows=4096, Columns=4096)
    ds.PixelData = bytes(4096 * 4096 * 2)  # 32 MiB of zeros: about 32 KiB deflated
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = c.compress(encode(ds, False, True)) + c.flush()
    assert len(payload) < MAX_INSTANCE_MB * 2**20 // 8
    assert raw_store(h.port, payload, context=CTImageStorage, affected=CTImageStorage, sop_uid=ds.SOPInstanceUID,
                     ts=U.DeflatedExplicitVRLittleEndian) == 0xA700


def oversized_on_the_wire(h: Hostile) -> None:
    ds = h.dataset(Rows=2048, Columns=2048)
    ds.PixelData = bytes(2048 * 2048 * 2)  # 8 MiB + the header: over max_instance_mb
    assert raw_store(h.port, encode(ds, False, True), context=CTImageStorage, affected=CTImageStorage,
                     sop_uid=ds.SOPInstanceUID) is None  # aborted while it arrives


def ct_on_mr_context(h: Hostile) -> None:
    ds = h.dataset()
    assert raw_store(h.port, encode(ds, False, True), context=MRImageStorage, affected=MRImageStorage,
                     sop_uid=ds.SOPInstanceUID) == 0xA900


def affected_mr_on_ct_context(h: Hostile) -> None:
    ds = h.dataset()
    assert raw_store(h.port, encode(ds, False, True), context=CTImageStorage, affected=MRImageStorage,
                     sop_uid=ds.SOPInstanceUID) == 0xA900


def garbage_after_data_set(h: Hostile) -> None:
    ds = h.dataset()
    payload = encode(ds, False, True) + random.Random(22).randbytes(4096)
    assert raw_store(h.port, payload, context=CTImageStorage, affected=CTImageStorage,
                     sop_uid=ds.SOPInstanceUID) == 0xC000


def private_element_claims_1_gib(h: Hostile) -> None:
    ds = h.dataset()
    bogus = (struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 8) + b"HOSTILE "
             + struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, 2**30) + bytes(1000))
    assert raw_store(h.port, encode(ds, False, True) + bogus, context=CTImageStorage, affected=CTImageStorage,
                     sop_uid=ds.SOPInstanceUID) == 0xC000


def implicit_vr_on_explicit_context(h: Hostile) -> None:
    ds = h.dataset()
    assert raw_store(h.port, encode(ds, True, True), context=CTImageStorage, affected=CTImageStorage,
                     sop_uid=ds.SOPInstanceUID) == 0xC000


CORPUS = (
    HostileCase("bare-connect-close", "11 connections opened and closed without a byte", bare_connect_close),
    HostileCase("random-bytes", "11 connections sending random bytes", random_bytes),
    HostileCase("slow-drip", "11 connections trickling an A-ASSOCIATE-RQ", slow_drip),
    HostileCase("idle-connections", "11 idle TCP connections", idle_connections),
    HostileCase("per-address-cap", f"{PER_ADDRESS + 1} connections from one address", per_address_cap),
    HostileCase("associate-rq-4gib", "an A-ASSOCIATE-RQ claiming 0xFFFFFFF0 bytes", associate_rq_claims_4_gib),
    HostileCase("pdata-1gib", "a P-DATA-TF claiming 1 GiB on a 256 KiB maximum PDU", pdata_claims_1_gib),
    HostileCase("pdata-slow-drip", "a P-DATA-TF trickling in one byte every 0.5 s", pdata_slow_drip),
    HostileCase("calling-ae-tab", "a calling AE title with a trailing tab", calling_ae_trailing_tab),
    HostileCase("called-ae-escape", "a called AE title with an ESC byte", called_ae_control_character),
    HostileCase("deflate-bomb", "a Deflated instance of ~33 KB inflating to 32 MiB", deflate_bomb),
    HostileCase("oversized-instance", "an uncompressed instance over max_instance_mb", oversized_on_the_wire),
    HostileCase("ct-on-mr-context", "CT data on an MR presentation context", ct_on_mr_context),
    HostileCase("affected-mr-on-ct", "Affected SOP Class MR on a CT context", affected_mr_on_ct_context),
    HostileCase("garbage-after-data-set", "4 KiB of random bytes after the data set", garbage_after_data_set),
    HostileCase("private-element-1gib", "a private element claiming 1 GiB", private_element_claims_1_gib),
    HostileCase("implicit-on-explicit", "implicit VR bytes on an explicit VR context", implicit_vr_on_explicit_context),
)


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_input_is_refused_and_the_node_is_unharmed(hostile, case):
    before = hostile.spooled()
    case.run(hostile)
    hostile.assert_unharmed(before)


def test_each_refusal_is_one_log_line_naming_the_peer_and_no_traceback(hostile):
    events = hostile.node.events()
    names = {e.get("event") for e in events}
    assert {"connection_closed", "connection_refused", "pdu_refused", "association_rejected", "store_refused"} <= names
    for e in events:
        if e.get("event") in ("connection_closed", "connection_refused", "pdu_refused"):
            assert e.get("peer") == "127.0.0.1" and e.get("reason"), e
    log = hostile.node.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    reasons = " ".join(str(e.get("reason")) for e in events)
    for fragment in ("longer than the maximum PDU 262144", "A-ASSOCIATE-RQ claims 4294967280 bytes",
                     "holds byte 0x09", "inflates to more than 8 MiB", "claims 1073741824 bytes",
                     "not a DICOM VR", "tags must ascend", "differs from its presentation context's",
                     f"{PER_ADDRESS} connections from this address"):
        assert fragment in reasons, fragment


def test_a_good_study_is_analysed_after_the_corpus(hostile, orthanc, tmp_path):
    files = phantom_series(tmp_path / "good", seed=23, n_slices=8)
    r = storescu(hostile.port, files)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    series = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    tags = orthanc.wait_for_instances(lambda t: any(x.get("Modality") == "OT" and x.get("StudyInstanceUID") == series
                                                    for x in t), timeout=60)
    assert any(x.get("StudyInstanceUID") == series for x in tags)
    spooled = sorted((hostile.node.workdir / "data" / "spool").rglob("*.dcm"))
    assert len(spooled) == 9  # the instance stored at start and this study: nothing any case sent
    r = subprocess.run(["/usr/bin/dcmdump", "-q", *map(str, spooled)], capture_output=True, text=True)
    assert r.returncode == 0 and "E:" not in r.stderr + r.stdout, r.stderr  # every acknowledged file reads


# --- TLS: the handshake runs in the connection's thread, within a deadline -------------------------
@pytest.fixture(scope="module")
def tls_node(tmp_path_factory):
    pytest.importorskip("cryptography")
    work = tmp_path_factory.mktemp("hostile-tls")
    paths, ca = self_signed(work / "pki")
    node = _start(work / "node", work / "outside", **{"tls.enabled": True, "tls.cert": paths["server"][0],
                                                      "tls.key": paths["server"][1], "tls.ca": ca,
                                                      "tls.verify_client": True})
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(*paths["client"])
    try:
        yield node, ctx, work / "outside"
    finally:
        node.stop()


def test_idle_sockets_on_the_tls_port_do_not_stop_a_mutual_tls_echo_and_are_closed(tls_node):
    node, ctx, outside = tls_node
    idle = [connect(node.port) for _ in range(3)]
    try:
        t0 = time.monotonic()
        assert echo(node.port, tls_args=(ctx, None)) == 0
        assert time.monotonic() - t0 < ASSOCIATE_S + 2  # never waits for the idle sockets
        assert all(closed_by_node(s, ASSOCIATE_S + 3) for s in idle)
    finally:
        for s in idle:
            s.close()
    failed = [e for e in node.events() if e.get("event") == "tls_handshake_failed"]
    assert len(failed) == 3 and all(e["peer"] == "127.0.0.1" and "associate_s" in e["reason"] for e in failed)
    assert not [p for p in outside.rglob("*") if p.is_file()]


def test_a_failed_tls_handshake_is_one_log_line_with_the_peer_and_the_reason(tls_node):
    node, ctx, _ = tls_node
    s = connect(node.port)
    s.sendall(associate_rq())  # plain DICOM to a TLS port
    assert closed_by_node(s, ASSOCIATE_S + 3)
    s.close()
    ctx_no_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ctx.get_ca_certs() and None)
    ctx_no_cert.check_hostname, ctx_no_cert.verify_mode = False, ssl.CERT_NONE
    assert echo(node.port, tls_args=(ctx_no_cert, None)) is None  # no client certificate
    wait_until(lambda: len([e for e in node.events() if e.get("event") == "tls_handshake_failed"
                            and "associate_s" not in e["reason"]]) >= 2, 10, "two handshake failures logged")
    lines = [e for e in node.events() if e.get("event") == "tls_handshake_failed" and "associate_s" not in e["reason"]]
    assert all(e["peer"] == "127.0.0.1" and ("SSL" in e["reason"] or "certificate" in e["reason"]) for e in lines)
    assert echo(node.port, tls_args=(ctx, None)) == 0
    assert "Traceback" not in node.log_path.read_text(errors="replace")
