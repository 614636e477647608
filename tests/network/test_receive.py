"""The SCP against real peers: dcmtk storescu (uncompressed, JPEG-LS, JPEG 2000), pynetdicom SCUs,
association policy (called AE, allow-list, TLS), disk minimum and malformed input."""

from __future__ import annotations

import json
import ssl
import sys

import pydicom
import pytest
from pydicom import uid as U
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from dicom_node.config import load_config
from dicom_node.durability.state import State
from dicom_node.engine.node import Node
from dicom_node.log import configure_logging
from nodekit import phantom_series, sc_job, storescu, wait_until
from pki import self_signed

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def make(**overrides) -> Node:
        base = dict(port=0, host="127.0.0.1", data_dir=str(tmp_path / f"data{len(nodes)}"), quiet_period_s=60.0,
                    min_free_disk_mb=0)
        cfg = load_config(None, overrides={**base, **overrides}, environ={})
        node = Node(cfg, run_job=sc_job).start()
        nodes.append(node)
        return node

    log_file = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log_file)
    yield make
    for n in nodes:
        n.stop()
    configure_logging(json=True, level="INFO", stream=sys.__stderr__)
    log_file.close()


def _scu(node: Node, *, calling="PYSCU", called="PENODE", contexts=(CTImageStorage,), tls_args=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for c in contexts:
        ae.add_requested_context(c, [U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian])
    return ae.associate("127.0.0.1", node.port, ae_title=called, tls_args=tls_args)


def _echo_ok(node: Node) -> bool:
    assoc = _scu(node)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("variant,syntax,flag", [
    (None, U.ExplicitVRLittleEndian, ()),
    ("jpeg-ls", U.JPEGLSLossless, ("-xt",)),
    ("jpeg2000", U.JPEG2000Lossless, ("-xv",)),
])
def test_storescu_series_is_spooled_as_received(make_node, tmp_path, variant, syntax, flag):
    files = phantom_series(tmp_path / "in", n_slices=10, variant=variant)
    node = make_node()
    r = storescu(node.port, files, extra=flag)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    rows = node.state.instances(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert len(rows) == 10
    assert {row.transfer_syntax for row in rows} == {syntax}
    for row in rows:  # the spooled file is the encoded data set as sent: same syntax, same pixel bytes
        spooled = pydicom.dcmread(row.path)
        assert spooled.file_meta.TransferSyntaxUID == syntax
        original = pydicom.dcmread(next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == row.sop_uid))
        assert spooled.PixelData == original.PixelData
    assert not list((tmp_path / "data0" / "spool").rglob(".tmp-*"))


def test_duplicate_instance_is_idempotent(make_node, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=8)
    node = make_node()
    assert storescu(node.port, files).returncode == 0
    r = storescu(node.port, files[:3])
    assert r.returncode == 0 and "E:" not in r.stderr
    series = node.state.series(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert series.n_instances == 8


def test_called_aet_mismatch_and_allow_list_reject_association(make_node):
    node = make_node(allowed_calling_aets=["GOODSCU", "HOSTSCU@127.0.0.1", "ELSEWHERE@10.9.9.9"])
    assert _scu(node, calling="GOODSCU", called="WRONGAET").is_rejected
    assert _scu(node, calling="BADSCU").is_rejected
    assert _scu(node, calling="ELSEWHERE").is_rejected  # right title, wrong host
    for ok in ("GOODSCU", "HOSTSCU"):
        assoc = _scu(node, calling=ok)
        assert assoc.is_established
        assoc.release()


def test_disk_minimum_answers_out_of_resources(make_node, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=8)
    node = make_node(min_free_disk_mb=10**9)
    assoc = _scu(node)
    status = assoc.send_c_store(pydicom.dcmread(files[0]))
    assoc.release()
    assert status.Status == 0xA700
    assert not list((tmp_path / "data0" / "spool").rglob("*.dcm"))
    assert node.state.instances(pydicom.dcmread(files[0]).SeriesInstanceUID) == []


def test_a_series_refused_or_ignored_slice_by_slice_costs_the_log_two_lines_each_not_one_per_slice(make_node, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=12)
    node = make_node()
    assoc = _scu(node, contexts=(CTImageStorage, MRImageStorage))
    statuses = []
    for f in files[:5]:  # an MR series: accepted and not analysed
        mr = pydicom.dcmread(f)
        mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        statuses.append(assoc.send_c_store(mr).Status)
    for f in files[5:9]:  # CT without pixel data: refused, every one for the same reason
        ds = pydicom.dcmread(f)
        del ds.PixelData
        statuses.append(assoc.send_c_store(ds).Status)
    bad_uid = pydicom.dcmread(files[9])
    bad_uid.SeriesInstanceUID = "1.2.3/../etc"
    statuses.append(assoc.send_c_store(bad_uid).Status)  # another reason: a line of its own
    assoc.release()
    assert statuses == [0x0000] * 5 + [0xA900] * 4 + [0xC000]

    def named(name):
        return [e for e in map(json.loads, (tmp_path / "node.log").read_text().splitlines()) if e.get("event") == name]

    wait_until(lambda: named("stores_refused"), 10, "the association's summary lines")  # logged as it ends

    assert len(named("instance_ignored")) == 1
    (ignored,) = named("instances_ignored")
    assert (ignored["sop_class_uid"], ignored["count"], ignored["ended"]) == (str(MRImageStorage), 5, "released")
    refused = named("store_refused")
    assert [e["status"] for e in refused] == ["0xA900", "0xC000"] and "no pixel data" in refused[0]["reason"]
    (grouped,) = named("stores_refused")
    assert (grouped["status"], grouped["count"]) == ("0xA900", 4) and grouped["reason"] == refused[0]["reason"]


def test_an_image_larger_than_max_image_size_is_refused_before_the_worker_would_decode_it(make_node, tmp_path):
    node = make_node(max_image_size=256)
    small = phantom_series(tmp_path / "small", n_slices=8, rows=256)[:2]
    big = phantom_series(tmp_path / "big", n_slices=8, rows=512, seed=5)
    assoc = _scu(node)
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in (*small, big[0])]
    assoc.release()
    assert statuses == [0x0000, 0x0000, 0xC000]
    assert not node.state.has_instance(pydicom.dcmread(big[0], stop_before_pixels=True).SOPInstanceUID)
    log = (tmp_path / "node.log").read_text()
    assert "image of 512 x 512 pixels is larger than max_image_size 256 a side" in log


def test_malformed_input_gets_clear_status_and_node_keeps_serving(make_node, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=8)
    node = make_node()
    good = pydicom.dcmread(files[0])
    assoc = _scu(node, contexts=(CTImageStorage, MRImageStorage))
    no_pixels = pydicom.dcmread(files[1])
    del no_pixels.PixelData
    assert assoc.send_c_store(no_pixels).Status == 0xA900
    bad_series = pydicom.dcmread(files[2])
    bad_series.SeriesInstanceUID = "1.2.3/../../etc"
    assert assoc.send_c_store(bad_series).Status == 0xC000
    long_uid = pydicom.dcmread(files[3])
    long_uid.StudyInstanceUID = "1." + "2" * 70
    assert assoc.send_c_store(long_uid).Status == 0xC000
    mr = pydicom.dcmread(files[4])
    mr.SOPClassUID = MRImageStorage
    mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    assert assoc.send_c_store(mr).Status == 0x0000  # accept_other_storage = ignore: accepted, not analysed
    # truncated file: pynetdicom sends the file's bytes without decoding them
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(files[5].read_bytes()[:-5000])
    assert assoc.send_c_store(truncated).Status == 0xC000
    # mixed series in one association: each instance goes to its own series
    other = phantom_series(tmp_path / "other", seed=99, n_slices=8)
    assert assoc.send_c_store(good).Status == 0
    assert assoc.send_c_store(pydicom.dcmread(other[0])).Status == 0
    assoc.release()
    assert _echo_ok(node)
    st = node.state
    assert {s.series_uid for s in st.all_series()} == {good.SeriesInstanceUID, pydicom.dcmread(other[0]).SeriesInstanceUID}
    assert not st.has_instance(mr.SOPInstanceUID) and not st.has_instance(no_pixels.SOPInstanceUID)
    log = (tmp_path / "node.log").read_text()
    assert "no pixel data" in log and "is not a DICOM UID" in log and "instance_ignored" in log
    assert "pixel data truncated" in log
    assert not list((tmp_path / "data0" / "spool").rglob("*etc*"))


def test_other_storage_rejected_when_configured(make_node, tmp_path):
    node = make_node(accept_other_storage="reject")
    assoc = _scu(node, contexts=(CTImageStorage, MRImageStorage))
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assoc.release()
    assert CTImageStorage in accepted and MRImageStorage not in accepted


def test_tls_association_with_client_certificate(make_node, tmp_path):
    pytest.importorskip("cryptography")
    paths, ca = self_signed(tmp_path)
    node = make_node(**{"tls.enabled": True, "tls.cert": paths["server"][0], "tls.key": paths["server"][1],
                        "tls.ca": ca, "tls.verify_client": True})
    files = phantom_series(tmp_path / "in", n_slices=8)

    def client(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.check_hostname = False
        if with_cert:
            ctx.load_cert_chain(*paths["client"])
        return ctx

    assoc = _scu(node, tls_args=(client(True), None))
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
    assoc.release()
    assert node.state.has_instance(pydicom.dcmread(files[0]).SOPInstanceUID)
    assert not _scu(node, tls_args=(client(False), None)).is_established  # no client certificate
    assert not _scu(node).is_established  # plain TCP to a TLS port


def test_storescu_without_tls_cannot_store_on_tls_port(make_node, tmp_path):
    pytest.importorskip("cryptography")
    paths, ca = self_signed(tmp_path)
    node = make_node(**{"tls.enabled": True, "tls.cert": paths["server"][0], "tls.key": paths["server"][1]})
    files = phantom_series(tmp_path / "in", n_slices=8)
    r = storescu(node.port, files[:1], timeout=60)
    assert r.returncode != 0 or "E:" in r.stderr
    assert State(tmp_path / "data0" / "state.sqlite").instances(pydicom.dcmread(files[0]).SeriesInstanceUID) == []


def test_certificate_dates_are_read_from_the_pem_as_cryptography_reads_them(tmp_path):
    from cryptography import x509

    from dicom_node.network.tls import bundle_dates, certificate_dates

    for days in (1.0, -3.0, 365.25 * 40):  # beyond 2049 the certificate says it in GeneralizedTime
        paths, _ = self_signed(tmp_path / f"d{days}", days=days)
        cert = x509.load_pem_x509_certificate(open(paths["server"][0], "rb").read())
        dates = certificate_dates(paths["server"][0])
        assert (dates.not_before, dates.not_after) == (cert.not_valid_before_utc, cert.not_valid_after_utc)
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=r"junk.pem: not a readable PEM X.509 certificate"):
        certificate_dates(tmp_path / "junk.pem")
    chain = tmp_path / "chain.pem"  # the node's certificate, then a block it cannot read: only the first counts
    chain.write_text(open(paths["server"][0]).read() + (tmp_path / "junk.pem").read_text())
    assert certificate_dates(chain).not_after == cert.not_valid_after_utc
    with pytest.raises(ValueError, match=r"chain.pem: certificate 2 of 2"):
        bundle_dates(chain)


def test_a_node_whose_certificate_has_ended_says_so_at_start_and_publishes_its_expiry(make_node, tmp_path):
    from cryptography import x509

    paths, _ = self_signed(tmp_path / "old", days=-2.0)
    node = make_node(**{"tls.enabled": True, "tls.cert": paths["server"][0], "tls.key": paths["server"][1]})
    (event,) = [e for e in map(json.loads, (tmp_path / "node.log").read_text().splitlines())
                if e["event"] == "tls_certificate"]
    assert event["level"] == "error" and event["days_left"] < -1.9 and "TLS peers refuse the node" in event["note"]
    expiry = node.metrics.registry.get_sample_value("dicom_node_tls_certificate_expiry_timestamp_seconds",
                                                    {"file": paths["server"][0]})
    cert = x509.load_pem_x509_certificate(open(paths["server"][0], "rb").read())
    assert expiry == cert.not_valid_after_utc.timestamp()
    fresh, _ = self_signed(tmp_path / "new", days=10.0)
    make_node(**{"tls.enabled": True, "tls.cert": fresh["server"][0], "tls.key": fresh["server"][1]})
    events = [e for e in map(json.loads, (tmp_path / "node.log").read_text().splitlines())
              if e["event"] == "tls_certificate"]
    assert events[-1]["level"] == "warning" and 9.9 < events[-1]["days_left"] <= 10.0  # within 30 days: renew
