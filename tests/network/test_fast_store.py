"""The node's own C-STORE path (dicom_node/network/fast_store.py) against real peers on loopback: dcmtk
storescu and pynetdicom SCUs, and P-DATA-TF PDUs laid out by hand on a real association (a command set
split over PDUs, a command and its data set in one PDU, two messages in one PDU, a fragment on the
wrong context), each checked against what is spooled and answered."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time

import pydicom
import pytest
from pydicom import uid as U
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, decode, encode
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.engine.node import Node
from dicom_node.network.fast_store import file_meta, parse_command_set, store_response_pdu
from nodekit import NodeProcess, incoming_empties, phantom_series, storescu

pytestmark = pytest.mark.dcmtk


def _node(make_node, tmp_path, name: str = "data", **overrides) -> Node:
    """A node (the shared fixture's) that completes no series while a test runs."""
    return make_node([], data_dir=str(tmp_path / name), quiet_period_s=60.0, **overrides)


def _spooled(node: Node, files) -> dict[str, bytes]:
    series = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    return {row.sop_uid: open(row.path, "rb").read() for row in node.state.instances(series)}


def _scu(node: Node):
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [U.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PENODE")
    assert assoc.is_established
    return assoc


def _command(ds: Dataset, message_id: int) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian, as an SCU encodes it."""
    cs = Dataset()
    cs.AffectedSOPClassUID = ds.SOPClassUID
    cs.CommandField = 0x0001
    cs.MessageID = message_id
    cs.Priority = 0
    cs.CommandDataSetType = 0x0000
    cs.AffectedSOPInstanceUID = ds.SOPInstanceUID
    cs.CommandGroupLength = len(encode(cs, True, True))
    return encode(cs, True, True)


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of (presentation context ID, message control header, fragment) values."""
    items = b"".join(struct.pack(">LBB", len(data) + 2, cx, control) + data for cx, control, data in pdvs)
    return struct.pack(">BBL", 4, 0, len(items)) + items


def _store_context(assoc) -> int:
    return next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)


def _send_raw(assoc, *pdus: bytes) -> None:
    # hold the requestor's reactor, as pynetdicom's send_* methods do, so the responses stay queued for us
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    for pdu in pdus:
        assoc.dul.socket.socket.sendall(pdu)


def _responses(assoc, n: int) -> list[tuple[int, int]]:
    """(MessageIDBeingRespondedTo, Status) of the next `n` messages the node sends."""
    out = []
    for _ in range(n):
        _, msg = assoc.dimse.get_msg(block=True)
        assert msg is not None, "no response from the node"
        out.append((msg.MessageIDBeingRespondedTo, msg.Status))
    assoc._reactor_checkpoint.set()
    return out


def test_file_meta_and_response_are_what_pydicom_and_pynetdicom_make():
    sop_class, sop = b"1.2.840.10008.5.1.4.1.1.2", b"1.2.3.4.5"
    expected = DicomBytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(expected, create_file_meta(sop_class_uid=sop_class.decode(), sop_instance_uid=sop.decode(),
                                                    transfer_syntax=U.ExplicitVRLittleEndian))
    assert file_meta(sop_class, sop, U.ExplicitVRLittleEndian) == expected.getvalue()

    pdu = store_response_pdu(3, 41, sop_class, sop, 0xA900)
    assert pdu[0] == 4 and struct.unpack(">L", pdu[2:6])[0] == len(pdu) - 6
    item_len, cx, control = struct.unpack(">LBB", pdu[6:12])
    assert (item_len, cx, control) == (len(pdu) - 10, 3, 0x03)
    cs = decode(pydicom.filebase.DicomBytesIO(pdu[12:]), True, True)
    assert (cs.CommandField, cs.MessageIDBeingRespondedTo, cs.Status, cs.CommandDataSetType) == (0x8001, 41, 0xA900, 0x0101)
    assert (cs.AffectedSOPClassUID, cs.AffectedSOPInstanceUID) == (sop_class.decode(), sop.decode())
    assert cs.CommandGroupLength == len(pdu) - 12 - 12

    assert parse_command_set(pdu[12:])[0x0120] == struct.pack("<H", 41)
    assert parse_command_set(pdu[12:-3]) is None  # an element running past the end
    assert parse_command_set(b"\x08\x00\x05\x00\x00\x00\x00\x00") is None  # not group 0000


@pytest.mark.parametrize("variant,flag", [(None, ()), ("jpeg-ls", ("-xt",))])
def test_storescu_series_spools_the_same_bytes_on_both_paths(make_node, tmp_path, variant, flag):
    files = phantom_series(tmp_path / "in", n_slices=8, variant=variant)
    fast, slow = _node(make_node, tmp_path), _node(make_node, tmp_path, "slow", fast_store=False)
    for node in (fast, slow):
        r = storescu(node.port, files, extra=flag)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    a, b = _spooled(fast, files), _spooled(slow, files)
    assert len(a) == 8 and a == b  # file meta and data set byte for byte as pynetdicom writes them
    incoming_empties(fast.spool.incoming_dir)  # nothing left behind


def test_small_pdus_and_echoes_between_stores_on_one_association(make_node, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=8, rows=96)[:3]
    node = _node(make_node, tmp_path, max_pdu=4096)  # 96 x 96 slices arrive in 5 PDUs each
    assoc = _scu(node)
    try:
        statuses = [assoc.send_c_echo().Status]
        for f in files:
            statuses.append(assoc.send_c_store(pydicom.dcmread(f)).Status)
            statuses.append(assoc.send_c_echo().Status)
    finally:
        assoc.release()
    assert statuses == [0] * 7
    assert len(_spooled(node, files)) == 3


def test_command_split_over_two_pdus_goes_to_pynetdicom_and_is_stored(make_node, tmp_path):
    f1, f2 = phantom_series(tmp_path / "in", n_slices=8)[:2]
    node = _node(make_node, tmp_path)
    assoc = _scu(node)
    try:
        cx = _store_context(assoc)
        ds = pydicom.dcmread(f1)
        cmd, data = _command(ds, 5), encode(ds, False, True)
        _send_raw(assoc, _pdu((cx, 0x01, cmd[:20])), _pdu((cx, 0x03, cmd[20:])), _pdu((cx, 0x00, data[:1000])),
                  _pdu((cx, 0x02, data[1000:])))
        assert _responses(assoc, 1) == [(5, 0x0000)]
        # the next message, whole, is on the node's path again (sent after the response, as a sender does
        # that negotiated no asynchronous operations: one message outstanding at a time)
        ds2 = pydicom.dcmread(f2)
        _send_raw(assoc, _pdu((cx, 0x03, _command(ds2, 6)), (cx, 0x02, encode(ds2, False, True))))
        assert _responses(assoc, 1) == [(6, 0x0000)]
    finally:
        assoc.release()
    assert set(_spooled(node, [f1])) == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (f1, f2)}


def test_two_stores_in_one_pdu_are_both_answered(make_node, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=8)[:2]
    node = _node(make_node, tmp_path)
    assoc = _scu(node)
    try:
        cx = _store_context(assoc)
        pdvs = []
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            data = encode(ds, False, True)
            pdvs += [(cx, 0x03, _command(ds, 10 + i)), (cx, 0x00, data[:500]), (cx, 0x02, data[500:])]
        _send_raw(assoc, _pdu(*pdvs))
        assert _responses(assoc, 2) == [(10, 0x0000), (11, 0x0000)]
    finally:
        assoc.release()
    assert len(_spooled(node, files)) == 2


def test_a_fragment_on_another_context_drops_the_message_and_the_node_keeps_serving(make_node, tmp_path):
    f1, f2 = phantom_series(tmp_path / "in", n_slices=8)[:2]
    node = _node(make_node, tmp_path)
    assoc = _scu(node)
    echo_cx = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == Verification)
    cx = _store_context(assoc)
    ds = pydicom.dcmread(f1)
    data = encode(ds, False, True)
    _send_raw(assoc, _pdu((cx, 0x03, _command(ds, 7)), (cx, 0x00, data[:1000])), _pdu((echo_cx, 0x02, data[1000:])))
    assoc.abort()
    assert not node.state.has_instance(ds.SOPInstanceUID)
    incoming_empties(node.spool.incoming_dir)  # the partial file is gone
    r = storescu(node.port, [f2])  # the node still receives
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    assert node.state.has_instance(pydicom.dcmread(f2, stop_before_pixels=True).SOPInstanceUID)


def test_a_spooled_file_left_short_is_stored_again_on_re_send(make_node, tmp_path):
    """A crash between the row's commit and the file's flush (nothing acknowledged) can leave the file
    short; the sender's re-send must not be taken for a duplicate."""
    files = phantom_series(tmp_path / "in", n_slices=8)[:3]
    node = _node(make_node, tmp_path)
    assert storescu(node.port, files).returncode == 0
    row = node.state.instance(pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
    with open(row.path, "r+b") as f:
        f.truncate(row.bytes // 2)
    r = storescu(node.port, files)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    assert open(row.path, "rb").read() == _spooled(node, files)[row.sop_uid]
    assert len(open(row.path, "rb").read()) == row.bytes
    log = (tmp_path / "node.log").read_text()
    assert log.count('"instance_restored"') == 1


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) not installed")
def test_a_data_set_that_cannot_be_written_is_answered_a701_and_the_association_goes_on(tmp_path):
    """A write that fails mid-data set (here: the node's file-size limit, as a full disk would) refuses that
    instance with 0xA701 once it has arrived, leaves no file behind, and the next instance is stored."""
    node = NodeProcess(tmp_path, quiet=60.0).start()
    try:
        subprocess.run([shutil.which("prlimit"), f"--pid={node.pid}", f"--fsize={200 * 1024}"], check=True)
        small = phantom_series(tmp_path / "small", n_slices=8)[:2]  # 64 x 64: about 9 KB each
        big = phantom_series(tmp_path / "big", n_slices=8, rows=512)[0]  # 512 x 512: 528 KB, past the limit
        assoc = _scu(node)
        try:
            statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in (small[0], big, small[1])]
        finally:
            assoc.release()
        assert statuses == [0x0000, 0xA701, 0x0000]
        refused = [e for e in node.events() if e.get("event") == "store_refused"]
        assert len(refused) == 1 and refused[0]["status"] == "0xA701" and "writing the received data set" in refused[0]["reason"]
        incoming_empties(tmp_path / "data" / "incoming")
    finally:
        node.stop()
