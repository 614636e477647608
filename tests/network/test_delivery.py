"""Result delivery into a real Orthanc: results arrive once, retries after the destination comes up,
exhausted retries are kept and resent by the CLI, warning statuses count, late instances re-run;
a failed delivery names its real cause (refused, timed out, rejected and why, TLS, C-STORE statuses)."""

from __future__ import annotations

import io
import json
import socket
from contextlib import redirect_stdout
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from dicom_node.cli import main as cli_main
from dicom_node.config import Destination, load_config
from dicom_node.durability.state import DeliveryState, JobState
from dicom_node.network.send import SendError, send_files
from nodekit import phantom_series, storescu, wait_until
from peers import OrthancPeer, free_port

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


def _ot(tags):
    return [t for t in tags if t.get("Modality") == "OT"]


@pytest.mark.parametrize("variant,flag", [(None, ()), ("jpeg-ls", ("-xt",))])
def test_results_arrive_in_orthanc_exactly_once(make_node, orthanc, tmp_path, variant, flag):
    files = phantom_series(tmp_path / "in", n_slices=20, variant=variant)
    node = make_node([f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"])
    r = storescu(node.port, files, extra=flag)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    tags = orthanc.wait_for_instances(lambda t: len(_ot(t)) == 1, timeout=60)
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    (sc,) = _ot(tags)
    assert sc["StudyInstanceUID"] == src.StudyInstanceUID
    wait_until(lambda: node.state.jobs(JobState.DONE), 30, "job done")
    (job,) = node.state.jobs()
    assert job.result_uids == (sc["SOPInstanceUID"],)
    assert {"received", "complete", "started", "preprocessed", "inferred", "built", "finished"} <= set(job.times)
    assert len(_ot([orthanc.instance_tags(i) for i in orthanc.instances()])) == 1


def test_destination_down_then_up_delivers_after_retries(make_node, tmp_path):
    port = free_port()
    files = phantom_series(tmp_path / "in", n_slices=20)
    node = make_node([f"ORTHANC@127.0.0.1:{port}"], **{"retry.max_attempts": 50})
    assert storescu(node.port, files).returncode == 0
    wait_until(lambda: any(d.attempts >= 2 for d in node.state.deliveries()), 30, "two failed attempts")
    orthanc = OrthancPeer(tmp_path / "orthanc", dicom_port=port).start()
    try:
        orthanc.wait_for_instances(lambda t: len(_ot(t)) == 1, timeout=60)
        wait_until(lambda: node.state.jobs(JobState.DONE), 30, "job done")
        (d,) = node.state.deliveries()
        assert d.state is DeliveryState.DONE and d.attempts >= 3
        retries = [json.loads(line) for line in (tmp_path / "node.log").read_text().splitlines() if "delivery_retry" in line]
        assert len(retries) == d.attempts - 1 and "connection refused" in retries[0]["error"]
    finally:
        orthanc.stop()


def test_exhausted_retries_are_kept_listed_and_resent(make_node, tmp_path):
    port = free_port()
    files = phantom_series(tmp_path / "in", n_slices=20)
    node = make_node([f"ORTHANC@127.0.0.1:{port}"], **{"retry.max_attempts": 2})
    assert storescu(node.port, files).returncode == 0
    (job,) = wait_until(lambda: node.state.jobs(JobState.FAILED), 30, "job failed")
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["status", "--data-dir", str(tmp_path / "data"), "--json"]) == 0
    (row,) = json.loads(out.getvalue())["jobs"]
    assert row["job_id"] == job.id and row["state"] == "failed"
    assert row["destinations"][0]["state"] == "failed" and row["destinations"][0]["attempts"] == 2
    orthanc = OrthancPeer(tmp_path / "orthanc", dicom_port=port).start()
    try:
        with redirect_stdout(io.StringIO()):
            assert cli_main(["resend", str(job.id), "--data-dir", str(tmp_path / "data")]) == 0
        orthanc.wait_for_instances(lambda t: len(_ot(t)) == 1, timeout=60)
        wait_until(lambda: node.state.job(job.id).state is JobState.DONE, 30, "job done after resend")
    finally:
        orthanc.stop()
    with redirect_stdout(io.StringIO()):
        assert cli_main(["resend", str(job.id), "--data-dir", str(tmp_path / "data")]) == 1  # no longer failed


def test_warning_status_counts_as_delivered(make_node, tmp_path):
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0xB007  # "data set does not match SOP class" warning: stored anyway

    ae = AE(ae_title="WARNPACS")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = make_node([f"WARNPACS@127.0.0.1:{server.server_address[1]}"])
        assert storescu(node.port, phantom_series(tmp_path / "in", n_slices=20)).returncode == 0
        wait_until(lambda: node.state.jobs(JobState.DONE), 30, "job done")
        assert len(received) == 1 and node.state.deliveries()[0].attempts == 1
    finally:
        server.shutdown()


def test_late_instances_rerun_once_with_predecessor(make_node, orthanc, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("NODE_TEST_JOB_MARKER", str(marker))
    monkeypatch.setenv("NODE_TEST_JOB_DELAY_S", "2.5")
    files = sorted(phantom_series(tmp_path / "in", n_slices=24))
    node = make_node([f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"])
    assert storescu(node.port, files[:20]).returncode == 0
    wait_until(lambda: list(marker.glob("started-*")), 30, "first job started")
    assert storescu(node.port, files[20:22]).returncode == 0   # two late batches while the job runs:
    assert storescu(node.port, files[22:]).returncode == 0     # still exactly one re-run
    tags = orthanc.wait_for_instances(lambda t: len(_ot(t)) == 2, timeout=90)
    wait_until(lambda: len(node.state.jobs(JobState.DONE)) == 2, 30, "two jobs done")
    first, second = node.state.jobs()
    assert (first.revision, second.revision) == (1, 2)
    assert second.predecessor_result_uids == first.result_uids
    comments = {t["SOPInstanceUID"]: json.loads(t["ImageComments"]) for t in _ot(tags)}
    assert comments[second.result_uids[0]] == {"revision": 2, "predecessors": list(first.result_uids), "instances": 24}
    assert comments[first.result_uids[0]]["instances"] == 20
    assert sorted(Path(p).name for p in marker.glob("started-*")) == [f"started-{first.id}-1", f"started-{second.id}-2"]


# --- the real cause of a failed delivery ---------------------------------------------------------

def _sc_files(tmp_path, n: int = 8):
    return sorted(phantom_series(tmp_path / "in", n_slices=n))


def test_a_destination_on_a_closed_port_is_reported_as_connection_refused(make_node, tmp_path):
    port = free_port()
    with pytest.raises(SendError) as e:
        send_files(_sc_files(tmp_path), Destination("ORTHANC", "127.0.0.1", port))
    assert e.value.cause == "connection_refused"
    assert f"connection refused by 127.0.0.1:{port}" in str(e.value) and "aborted" not in str(e.value)
    node = make_node([f"ORTHANC@127.0.0.1:{port}"], **{"retry.max_attempts": 1})
    assert storescu(node.port, phantom_series(tmp_path / "in2", n_slices=20)).returncode == 0
    wait_until(lambda: node.state.jobs(JobState.FAILED), 30, "job failed")
    (d,) = node.state.deliveries()
    assert "connection refused" in d.last_error
    (ev,) = [json.loads(line) for line in (tmp_path / "node.log").read_text().splitlines() if "delivery_failed" in line]
    assert ev["cause"] == "connection_refused"


def test_a_peer_that_does_not_answer_the_connection_is_reported_as_timed_out(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=2)  # the backlog is full from now on
    try:
        cfg = load_config(None, environ={}, overrides={"timeouts.acse_s": 1.0})
        with pytest.raises(SendError) as e:
            send_files(_sc_files(tmp_path), Destination("SLOW", "127.0.0.1", listener.getsockname()[1]), config=cfg)
    finally:
        filler.close()
        listener.close()
    assert e.value.cause == "timed_out" and "timed out after 1 s" in str(e.value)


def test_a_rejected_association_names_the_result_source_and_reason(tmp_path):
    ae = AE(ae_title="REALPACS")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    ae.require_called_aet = True
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        with pytest.raises(SendError) as e:
            send_files(_sc_files(tmp_path), Destination("WRONGAE", "127.0.0.1", server.server_address[1]))
    finally:
        server.shutdown()
    assert e.value.cause == "rejected"
    assert "association rejected (Rejected Permanent; source: Service User; reason: Called AE title not recognised)" \
        in str(e.value)


def test_every_instance_the_peer_refuses_is_named_with_its_c_store_status(tmp_path):
    files = _sc_files(tmp_path)
    refused = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[::2]}
    stored = []

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in refused:
            return 0xA700
        stored.append(uid)
        return 0x0000

    ae = AE(ae_title="FULLPACS")
    ae.add_supported_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        with pytest.raises(SendError) as e:
            send_files(files, Destination("FULLPACS", "127.0.0.1", server.server_address[1]))
    finally:
        server.shutdown()
    assert e.value.cause == "store_failed" and {u for u, _ in e.value.failed} == refused
    assert {c for _, c in e.value.failed} == {0xA700} and e.value.sent == len(files) - len(refused) == len(stored)
    assert f"C-STORE failed for {len(refused)} of {len(files)} instance(s)" in str(e.value)
    for uid in refused:
        assert f"{uid}: 0xA700 (Refused: Out of Resources)" in str(e.value)


def test_a_delivery_to_a_working_peer_opens_one_connection_and_no_empty_probe(tmp_path):
    """The cause probe (a bare TCP connect, or a TLS handshake, then close) runs only after an association
    failed: a PACS that works must not log an empty connection for every delivery."""
    opened = []
    files = _sc_files(tmp_path)
    ae = AE(ae_title="COUNTPACS")
    ae.add_supported_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.append(event.address)),
                                           (evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        assert send_files(files, Destination("COUNTPACS", "127.0.0.1", server.server_address[1])).sent == len(files)
    finally:
        server.shutdown()
    assert len(opened) == 1, opened


def test_a_tls_destination_that_does_not_speak_tls_is_reported_as_a_failed_tls_handshake(tmp_path):
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "node.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (tmp_path / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ae = AE(ae_title="PLAINPACS")
    ae.add_supported_context(SecondaryCaptureImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    dest = f"PLAINPACS@127.0.0.1:{server.server_address[1]}+tls"
    try:
        cfg = load_config(None, environ={}, overrides={"tls.cert": str(tmp_path / "node.pem"),
                                                      "tls.key": str(tmp_path / "node.key"),
                                                      "tls.ca": str(tmp_path / "node.pem"), "destinations": [dest]})
        with pytest.raises(SendError) as e:
            send_files(_sc_files(tmp_path), cfg.destinations[0], config=cfg)
    finally:
        server.shutdown()
    assert e.value.cause == "tls_failed" and "TLS handshake failed" in str(e.value)


def test_the_node_as_scu_turns_nagle_off_on_its_association(storescp):
    """A C-STORE's command set and data set go out as separate PDUs; with Nagle on, the data set waits for
    the peer's delayed ACK (~40 ms an instance). The node's SCU sockets must have TCP_NODELAY set."""
    from dicom_node.network.send import associate, client_ae

    ae = client_ae(None, "PENODE")
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = associate(ae, Destination(storescp.aet, "127.0.0.1", storescp.port), "PENODE", None)
    try:
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def _dicom_files(folder: Path) -> list[pydicom.Dataset]:
    out = []
    for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if f.is_file():
            try:
                out.append(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception:  # storescp is still writing it: the next poll reads it whole
                pass
    return out


def test_results_are_delivered_over_tls_to_a_pacs_that_requires_the_nodes_certificate(make_node, tmp_path):
    from peers import StoreScpPeer
    from pki import self_signed

    certs, ca = self_signed(tmp_path / "pki")
    # dcmtk storescp as a TLS-only PACS that requires (and verifies against the CA) a client certificate
    pacs = StoreScpPeer(tmp_path / "pacs", aet="TLSPACS",
                        extra_args=("+tls", certs["server"][1], certs["server"][0], "+cf", ca, "-rc")).start()
    try:
        node = make_node([f"TLSPACS@127.0.0.1:{pacs.port}+tls"], **{
            "tls.cert": certs["client"][0], "tls.key": certs["client"][1], "tls.ca": ca})
        files = phantom_series(tmp_path / "in", n_slices=12)
        assert storescu(node.port, files).returncode == 0
        (job,) = wait_until(lambda: node.state.jobs(JobState.DONE), 60, "delivered over TLS")
        (d,) = node.state.deliveries(job.id)
        assert d.destination.endswith("+tls") and d.state is DeliveryState.DONE
        got = wait_until(lambda: _dicom_files(pacs.outdir), 30, "the result in the TLS PACS")
        assert {str(ds.SOPInstanceUID) for ds in got} == set(job.result_uids)
        # the same PACS refuses a node whose certificate it does not trust: the failure names TLS
        other, _ = self_signed(tmp_path / "other-pki")
        cfg = load_config(None, environ={}, overrides={"tls.cert": other["client"][0], "tls.key": other["client"][1],
                                                      "tls.ca": ca, "destinations": [f"TLSPACS@127.0.0.1:{pacs.port}+tls"]})
        with pytest.raises(SendError) as e:
            send_files(files[:1], cfg.destinations[0], config=cfg)
        assert e.value.cause == "tls_failed" and "the peer refused this node's TLS certificate" in str(e.value)
    finally:
        pacs.stop()


def test_send_back_to_sender_returns_results_to_a_listed_peer_and_to_no_one_else(make_node, storescp, tmp_path):
    node = make_node([], send_back_to_sender=True, peers=[f"SCANNER@127.0.0.1:{storescp.port}"])
    listed = phantom_series(tmp_path / "a", n_slices=12, seed=11)
    assert storescu(node.port, listed, aet="SCANNER").returncode == 0
    (job,) = wait_until(lambda: node.state.jobs(JobState.DONE), 60, "the peer's study delivered")
    (d,) = node.state.deliveries(job.id)
    assert d.destination == f"SCANNER@127.0.0.1:{storescp.port}" and d.state is DeliveryState.DONE
    wait_until(lambda: {str(ds.SOPInstanceUID) for ds in _dicom_files(storescp.outdir)} >= set(job.result_uids), 30,
               "the results at the sending peer")
    unlisted = phantom_series(tmp_path / "b", n_slices=12, seed=12)
    assert storescu(node.port, unlisted, aet="UNKNOWN").returncode == 0
    wait_until(lambda: len(node.state.jobs(JobState.DONE)) == 2, 60, "the unlisted sender's study analysed")
    other = next(j for j in node.state.jobs(JobState.DONE) if j.id != job.id)
    assert node.state.deliveries(other.id) == []  # not a peer: its results go nowhere


def test_the_scu_reactor_never_takes_a_response_meant_for_the_sending_thread(storescp):
    """pynetdicom's requestor reactor polls the DIMSE queue; a response it takes there is dropped ("Received
    unexpected C-STORE service message") and the sender waits out the DIMSE timeout. On the node's SCU
    association a queued response stays for the thread that waits for it."""
    import time

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import Verification

    from dicom_node.network.send import associate, client_ae

    ae = client_ae(None, "PENODE")
    ae.add_requested_context(Verification)
    assoc = associate(ae, Destination(storescp.aet, "127.0.0.1", storescp.port), "PENODE", None)
    try:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0x0000
        assoc.dimse.msg_queue.put((1, rsp))  # as if the peer had answered a C-STORE this instant
        time.sleep(0.2)  # the reactor polls every millisecond
        assert assoc.dimse.msg_queue.qsize() == 1
        assert assoc.dimse.get_msg(block=True) == (1, rsp)
        assert assoc.send_c_echo().Status == 0x0000  # requests and their answers still flow
    finally:
        assoc.release()
