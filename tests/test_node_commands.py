"""The node's commands against real peers: status (one row per job), resend to the address as
configured now or --to, echo's calling AE, send by content with honest exit codes, --version,
ports in use, SIGHUP reloads."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.cli import main as cli_main
from dicom_node.durability.state import DeliveryState, JobState
from nodekit import REPO, NodeProcess, phantom_series, storescu, wait_until, write_config
from peers import free_port

pytestmark = [pytest.mark.dcmtk]


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _failed_job(make_node, tmp_path, port: int):
    node = make_node([f"STORESCP@127.0.0.1:{port}"], **{"retry.max_attempts": 1})
    files = phantom_series(tmp_path / "in", n_slices=20)
    assert storescu(node.port, files).returncode == 0
    (job,) = wait_until(lambda: node.state.jobs(JobState.FAILED), 30, "job failed")
    return node, job, files


def test_status_prints_one_aligned_row_per_job_with_its_delivery_and_the_exact_resend_command(make_node, tmp_path):
    dead = free_port()
    node, job, files = _failed_job(make_node, tmp_path, dead)
    data = str(tmp_path / "data")
    rc, out, _ = _cli("status", "--data-dir", data)
    assert rc == 0
    lines = out.splitlines()
    (header,) = [line for line in lines if line.startswith("JOB ")]
    (row,) = [line for line in lines if line.startswith(f"{job.id} ")]
    for column in ("STUDY", "SERIES", "RECEIVED", "STATE", "RESULT", "DESTINATIONS", "LAST ERROR"):
        assert column in header
    assert header.index("STATE") == row.index("failed")  # aligned under its heading
    assert f"..{job.series_uid[-8:]}" in row and f"..{job.study_uid[-8:]}" in row
    assert f"SR ..{job.result_uids[0][-8:]}" in row
    assert out.count(f"STORESCP@127.0.0.1:{dead}") == 1  # the destination once, with its state
    assert f"STORESCP@127.0.0.1:{dead} failed after 1 attempt(s)" in row and "connection refused" in row
    assert f"re-send with: dicom-node resend {job.id} --data-dir {Path(data).resolve()}" in out
    assert "resend JOB" not in out and " done" not in row
    rc, out, _ = _cli("status", "--data-dir", data, "--json")
    (j,) = json.loads(out)["jobs"]
    assert j["job_id"] == job.id and j["state"] == "failed" and j["sr_uid"] == job.result_uids[0]
    assert j["destinations"] == [{"destination": f"STORESCP@127.0.0.1:{dead}", "state": "failed", "attempts": 1,
                                  "delivery": "failed after 1 attempt(s)",
                                  "last_error": f"STORESCP@127.0.0.1:{dead}: {j['last_error']}"}]
    assert "connection refused" in j["last_error"] and j["resend_command"].startswith(f"dicom-node resend {job.id} ")


def test_resend_goes_to_the_destination_as_configured_now_or_to_the_override(make_node, tmp_path, storescp):
    node, job, files = _failed_job(make_node, tmp_path, free_port())
    cfg = write_config(tmp_path / "fixed.toml", data_dir=str(tmp_path / "data"),
                       destinations=[f"STORESCP@127.0.0.1:{storescp.port}"])
    rc, out, err = _cli("resend", str(job.id), "--config", str(cfg))
    assert rc == 0, err
    assert f"-> STORESCP@127.0.0.1:{storescp.port}" in out
    wait_until(lambda: node.state.job(job.id).state is JobState.DONE, 30, "delivered to the fixed address")
    assert node.state.deliveries(job.id)[0].destination == f"STORESCP@127.0.0.1:{storescp.port}"
    # a second failed job, re-sent with --to while the configuration still names the dead address
    assert storescu(node.port, phantom_series(tmp_path / "in2", seed=8, n_slices=20)).returncode == 0
    (job2,) = wait_until(lambda: node.state.jobs(JobState.FAILED), 30, "second job failed")
    rc, out, err = _cli("resend", str(job2.id), "--data-dir", str(tmp_path / "data"),
                        "--to", f"OTHER@127.0.0.1:{storescp.port}")
    assert rc == 0, err
    wait_until(lambda: node.state.job(job2.id).state is JobState.DONE, 30, "delivered to --to")
    (d,) = node.state.deliveries(job2.id)
    assert d.destination == f"OTHER@127.0.0.1:{storescp.port}" and d.state is DeliveryState.DONE


def test_resend_runs_a_job_waiting_for_its_inference_backend_at_once(tmp_path):
    from dicom_node.durability.state import State

    data = tmp_path / "data"
    data.mkdir()
    st = State(data / "state.sqlite")
    job = st.create_job("1.2.3", "1.2")
    st.claim_next_job()
    st.defer_job(job, not_before=4102444800.0, error="BackendUnavailable: Triton server grpc://h:1: not answering")
    rc, out, err = _cli("resend", str(job), "--data-dir", str(data))
    assert rc == 0, err
    at = time.strftime("%H:%M:%S", time.localtime(4102444800.0))
    assert out.strip() == (f"job {job}: was waiting for its inference backend (next try at {at}); it runs now, "
                           "with fresh tries")
    assert (st.job(job).not_before, st.job(job).deferrals) == (0, 0) and st.claim_next_job().id == job
    rc, out, err = _cli("resend", str(job), "--data-dir", str(data))  # running now: nothing to resend
    assert rc == 1 and f"job {job} is running, not failed" in err
    st.close()


def test_status_says_a_waiting_job_has_used_how_many_of_its_tries_when_it_runs_next_and_how_to_run_it_now(tmp_path):
    from dicom_node.durability.state import State

    data = tmp_path / "data"
    data.mkdir()
    st = State(data / "state.sqlite")
    job = st.create_job("1.2.3", "1.2")
    for _ in range(2):
        st.run_deferred_now()  # as a restart does: the count stays
        st.claim_next_job()
        st.defer_job(job, not_before=4102444800.0, error="BackendUnavailable: Triton server grpc://h:1: not answering")
    rc, out, err = _cli("status", "--data-dir", str(data))
    assert rc == 0, err
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(4102444800.0))
    assert f"queued, next try {at[11:]}" in out and "BackendUnavailable: Triton server grpc://h:1" in out
    assert (f"job {job} waits for its inference backend (2 of 11 tries failed, next try {at}); run it now with: "
            f"dicom-node resend {job}") in out
    rc, out, err = _cli("status", "--data-dir", str(data), "--json")
    (row,) = json.loads(out)["jobs"]
    assert (row["backend_tries_failed"], row["state"]) == (2, "queued")
    st.close()


def test_echo_with_config_calls_as_the_configured_ae_title(tmp_path):
    seen = []
    ae = AE(ae_title="ECHOPEER")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, lambda e: seen.append(e.assoc.requestor.ae_title) or 0)])
    try:
        cfg = write_config(tmp_path / "node.toml", ae_title="MYNODE")
        rc, out, err = _cli("echo", f"ECHOPEER@127.0.0.1:{server.server_address[1]}", "--config", str(cfg))
        assert rc == 0, err
        rc, _, err = _cli("echo", f"ECHOPEER@127.0.0.1:{server.server_address[1]}", "--calling-aet", "OTHER")
        assert rc == 0, err
    finally:
        server.shutdown()
    assert seen == ["MYNODE", "OTHER"]
    rc, _, err = _cli("echo", f"NOBODY@127.0.0.1:{free_port()}")
    assert rc == 1 and "connection refused" in err


def test_send_reads_files_by_content_reports_skipped_files_and_exits_non_zero_for_nothing_sendable(tmp_path, storescp):
    files = phantom_series(tmp_path / "in", n_slices=8)
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, f in enumerate(files):
        f.rename(plain / f"IM{i:04d}")  # no .dcm extension, as from many modalities
    (plain / "README.txt").write_text("not DICOM\n")
    to = f"STORESCP@127.0.0.1:{storescp.port}"
    rc, out, err = _cli("send", str(plain), "--to", to)
    assert rc == 0, err
    assert "sent 8 instance(s)" in out and "README.txt: not a DICOM file" in err
    assert len(list(storescp.outdir.iterdir())) == 8
    toml = write_config(tmp_path / "node.toml", ae_title="X")
    r = _run("send", str(toml), "--to", to)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "node.toml: not a DICOM file" in r.stderr and "nothing to send" in r.stderr


def test_send_exits_1_and_names_each_refused_instance_with_its_status(tmp_path):
    ae = AE(ae_title="FULLPACS")
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0xA700)])
    try:
        files = phantom_series(tmp_path / "in", n_slices=8)
        rc, out, err = _cli("send", str(tmp_path / "in"), "--to", f"FULLPACS@127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert rc == 1
    assert err.count("0xA700 (Refused: Out of Resources)") >= 8 and all(str(f) in err for f in files)
    assert "sent 0 of 8 instance(s)" in err


def test_version_prints_the_package_and_the_bundle_name_and_version():
    from dicom_node import __version__

    rc, out, _ = _cli("--version")
    assert rc == 0
    assert f"dicom-node {__version__}" in out and "model bundle: pe-demo-tiny" in out and "bundled demo" in out


def test_ports_in_use_are_one_line_naming_the_key_and_nothing_listens(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cfg = write_config(tmp_path / "node.toml", host="127.0.0.1", port=port, data_dir=str(tmp_path / "data"))
        r = _run("serve", "--config", str(cfg), "--job", "nodekit:SC_JOB")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"port: {port} is already in use on 127.0.0.1" in r.stderr and "set port (--port)" in r.stderr
        cfg = write_config(tmp_path / "node.toml", host="127.0.0.1", port=free_port(), metrics_port=port,
                           data_dir=str(tmp_path / "data"))
        r = _run("serve", "--config", str(cfg), "--job", "nodekit:SC_JOB")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert f"metrics_port: {port} is already in use" in r.stderr
        assert "scp_listening" not in r.stdout and "node_started" not in r.stdout
    finally:
        busy.close()


def test_sighup_reloads_the_live_keys_logs_what_changed_and_keeps_running(tmp_path, storescp):
    node = NodeProcess(tmp_path, destinations=[f"STORESCP@127.0.0.1:{free_port()}"]).start()
    try:
        text = node.config.read_text().replace(
            "destinations = [", f'destinations = ["STORESCP@127.0.0.1:{storescp.port}"] #')
        node.config.write_text(text.replace("quiet_period_s = 0.6", "quiet_period_s = 0.7\nmax_associations = 5"))
        node.proc.send_signal(signal.SIGHUP)
        (ev,) = wait_until(lambda: [e for e in node.events() if e["event"] == "config_reloaded"], 20, "reload")
        assert ev["changed"] == ["destinations", "quiet_period_s"] and ev["restart_needed"] == ["max_associations"]
        assert node.proc.poll() is None
        files = phantom_series(tmp_path / "in", n_slices=20)
        assert storescu(node.port, files).returncode == 0
        wait_until(lambda: any(e["event"] == "results_sent" for e in node.events()), 30, "sent to the new destination")
        series = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert any(pydicom.dcmread(f).StudyInstanceUID == series for f in storescp.outdir.iterdir())
    finally:
        node.stop()
    assert any(e["event"] == "node_stopped" for e in node.events())
    (started,) = [e for e in node.events() if e["event"] == "node_started"]
    assert started["fsync"] == ("posix_aio" if sys.platform == "linux" else "thread_pool")  # durability/flush.py


def test_check_passes_what_is_ready_and_names_each_failure_with_its_fix_without_changing_anything(storescp, tmp_path):
    dead, hl7 = free_port(), free_port()
    cfg = write_config(tmp_path / "node.toml", ae_title="PENODE", port=free_port(), data_dir=str(tmp_path / "data"),
                       destinations=[f"STORESCP@127.0.0.1:{storescp.port}", f"PACS@127.0.0.1:{dead}"],
                       **{"notify.hl7_host": "127.0.0.1", "notify.hl7_port": hl7})
    cfg.chmod(0o600)
    r = _run("check", "--config", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"dicom-node check: {cfg}"
    ok = {line.split(None, 2)[1] for line in lines[1:-1] if line.startswith("  ok")}
    assert {"file", "data", "state", "model", "DICOM", "destination"} <= ok, r.stdout
    assert any(f"STORESCP@127.0.0.1:{storescp.port}: C-ECHO as PENODE answered 0x0000" in x for x in lines)
    (pacs,) = [x for x in lines if f"PACS@127.0.0.1:{dead}" in x]
    assert pacs.startswith("  FAIL  destination") and "connection refused" in pacs and "check that the peer" in pacs
    (ris,) = [x for x in lines if "HL7 receiver" in x]
    assert ris.startswith("  FAIL") and f"127.0.0.1:{hl7} does not accept a connection" in ris
    assert "pe-demo-tiny 0.3.0 (ma2022) on CPUExecutionProvider" in r.stdout
    assert "state.sqlite: none yet (made at first start)" in r.stdout
    assert lines[-1] == f"2 of {len(lines) - 2} checks failed"
    assert not (tmp_path / "data").exists(), "check created the data folder"
    r = _run("check", "--config", str(cfg), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["ok"] is False and report["config"] == str(cfg)
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["destination", "HL7 receiver"]


def test_check_sees_a_running_node_its_database_and_refuses_a_world_writable_config_and_a_missing_bundle(
        make_node, storescp, tmp_path):
    node = make_node([f"STORESCP@127.0.0.1:{storescp.port}"])
    files = phantom_series(tmp_path / "in", n_slices=12, rows=32)
    assert storescu(node.port, files).returncode == 0
    wait_until(lambda: node.state.jobs(JobState.DONE), 30, "job done")
    (tmp_path / "not-a-bundle").mkdir()  # a folder without a manifest (a missing one is a configuration error)
    cfg = write_config(tmp_path / "node.toml", ae_title="PENODE", port=node.port, data_dir=str(tmp_path / "data"),
                       destinations=[f"STORESCP@127.0.0.1:{storescp.port}"],
                       **{"inference.bundle": str(tmp_path / "not-a-bundle")})
    cfg.chmod(0o666)
    r = _run("check", "--config", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "answers C-ECHO as PENODE: the node is running already" in r.stdout
    assert "quick_check ok, 1 job(s)" in r.stdout and "schema version 6" in r.stdout
    (perm,) = [x for x in r.stdout.splitlines() if "file permissions" in x]
    assert perm.startswith("  FAIL") and f"chmod o-w {cfg}" in perm
    (model,) = [x for x in r.stdout.splitlines() if " model " in x]
    assert model.startswith("  FAIL") and str(tmp_path / "not-a-bundle") in model
    assert r.stdout.splitlines()[-1].startswith("2 of ")


def test_check_fails_a_certificate_that_has_ended_and_counts_the_days_of_one_that_has_not(tmp_path):
    from pki import self_signed

    for days, says in ((-2.0, "  FAIL  TLS"), (10.0, "  ok    TLS")):
        paths, ca = self_signed(tmp_path / f"pki{days}", days=days)
        cfg = write_config(tmp_path / f"node{days}.toml", ae_title="PENODE", port=free_port(),
                           data_dir=str(tmp_path / "data"),
                           **{"tls.enabled": True, "tls.cert": paths["server"][0], "tls.key": paths["server"][1]})
        r = _run("check", "--config", str(cfg))
        (line,) = [x for x in r.stdout.splitlines() if x.startswith(says)]
        if days < 0:
            assert "not now: TLS peers would refuse the node; install a valid certificate" in line
        else:
            assert "valid until" in line and "renew it within 10 days" in line
    paths, ca = self_signed(tmp_path / "old-ca", days=10.0, ca_days=-1.0)
    cfg = write_config(tmp_path / "node-ca.toml", ae_title="PENODE", port=free_port(), data_dir=str(tmp_path / "data"),
                       **{"tls.enabled": True, "tls.cert": paths["server"][0], "tls.key": paths["server"][1],
                          "tls.ca": ca, "tls.verify_client": True})
    (line,) = [x for x in _run("check", "--config", str(cfg)).stdout.splitlines() if "TLS CA" in x]
    assert line.startswith("  FAIL") and "the certificates it signed no longer verify" in line


def test_check_reads_every_certificate_of_a_ca_bundle_and_fails_the_one_that_has_ended(tmp_path):
    from cryptography import x509

    from pki import self_signed

    paths, good_ca = self_signed(tmp_path / "good", days=10.0, ca_days=400.0)
    _, ended_ca = self_signed(tmp_path / "ended", ca_days=-1.0)
    _, other_ca = self_signed(tmp_path / "other", ca_days=100.0)

    def ca_line(*cas: str) -> str:
        bundle = tmp_path / f"bundle{len(cas)}-{cas[-1] == ended_ca}.pem"
        bundle.write_text("".join(Path(c).read_text() for c in cas))
        cfg = write_config(tmp_path / "node.toml", ae_title="PENODE", port=free_port(), data_dir=str(tmp_path / "data"),
                           **{"tls.enabled": True, "tls.cert": paths["server"][0], "tls.key": paths["server"][1],
                              "tls.ca": str(bundle), "tls.verify_client": True})
        (line,) = [x for x in _run("check", "--config", str(cfg)).stdout.splitlines() if "TLS CA" in x]
        return line

    line = ca_line(good_ca, other_ca, ended_ca)  # the ended one last: reading only the first missed it
    assert line.startswith("  FAIL") and "certificate 3 of 3 in" in line and "remove it from the bundle" in line
    line = ca_line(good_ca, other_ca)
    assert line.startswith("  ok") and "2 CA certificates in" in line
    ends = x509.load_pem_x509_certificate(Path(other_ca).read_bytes()).not_valid_after_utc  # the sooner of the two
    assert f"the first to end valid until {ends:%Y-%m-%d}" in line
