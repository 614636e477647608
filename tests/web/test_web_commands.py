"""The commands around the worklist: `dicom-node hash-password` makes entries the node accepts, and
`dicom-node rerun` (the same code as the worklist's Re-run button) re-analyses a finished series on
a running node; both answer bad input with one line. A study whose model server is away says so in the
worklist and on its page."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from dicom_node.config import load_config
from dicom_node.model.inference import BackendUnavailable
from dicom_node.web.auth import Credentials
from nodekit import phantom_series, storescu, wait_until
from peers import free_port, needs_dcmtk
from webkit import WebClient, web_config

EXE = str(Path(sys.executable).parent / "dicom-node")


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_hash_password_prints_a_users_entry_the_node_accepts_and_that_logs_in(tmp_path):
    r = _cli("hash-password", "dr.jones", stdin="s3cret-enough\n")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout.strip())  # printed as a quoted TOML string
    assert entry.startswith("dr.jones:$argon2id$") and "s3cret-enough" not in r.stdout
    cfg = load_config(None, environ={}, overrides={"web.users": [entry], "web.enabled": True, "metrics_port": 8080})
    creds = Credentials(cfg.web.users, cfg.web.api_tokens, cfg.web.admins)
    assert creds.check_password("dr.jones", "s3cret-enough") is not None
    assert creds.check_password("dr.jones", "s3cret-enougH") is None
    again = json.loads(_cli("hash-password", "dr.jones", stdin="s3cret-enough\n").stdout.strip())
    assert again != entry  # a fresh salt every time


def test_hash_password_token_prints_a_token_and_the_digest_entry_for_the_api(tmp_path):
    r = _cli("hash-password", "ris-robot", "--token")
    assert r.returncode == 0, r.stderr
    token = r.stdout.split("it is not stored): ", 1)[1].split()[0]
    entry = json.loads(r.stdout.split("[web] api_tokens entry: ", 1)[1].strip())
    cfg = load_config(None, environ={}, overrides={"web.api_tokens": [entry]})
    creds = Credentials(cfg.web.users, cfg.web.api_tokens, cfg.web.admins)
    assert creds.check_token(token).name == "ris-robot" and creds.check_token(token + "x") is None


def test_hash_password_refuses_a_short_password_and_a_bad_name_with_one_line():
    r = _cli("hash-password", "dr.jones", stdin="short\n")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("dicom-node hash-password: the password has fewer than 8 characters; choose a longer one")
    r = _cli("hash-password", "dr jones:x", stdin="long enough password\n")
    assert r.returncode == 2 and "NAME 'dr jones:x' is not allowed" in r.stderr and len(r.stderr.splitlines()) == 1


@needs_dcmtk
def test_rerun_queues_a_finished_series_again_and_the_running_node_analyses_it(make_node, tmp_path):
    node = make_node([])
    files = phantom_series(tmp_path / "in", n_slices=12, rows=32)
    assert storescu(node.port, files).returncode == 0
    wait_until(lambda: [j for j in node.state.jobs() if j.state.value == "done"], 30, "first job done")
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    data = str(tmp_path / "data")
    r = _cli("rerun", series, "--data-dir", data)
    assert r.returncode == 0 and "queued to analyse it again" in r.stdout, r.stderr
    wait_until(lambda: len([j for j in node.state.jobs() if j.state.value == "done"]) == 2, 30, "re-run done")
    assert [j.revision for j in node.state.jobs()] == [1, 2]  # delivered before: the re-run is a new revision
    r = _cli("rerun", "1.2.3.4", "--data-dir", data)
    assert r.returncode == 1 and r.stderr.strip() == "dicom-node rerun: series 1.2.3.4 is unknown to this node"
    r = _cli("rerun", "1.2.x", "--data-dir", data)
    assert r.returncode == 2 and r.stderr.startswith("dicom-node rerun: SERIES_UID: '1.2.x'") and len(r.stderr.splitlines()) == 1


def test_config_shows_user_and_token_names_but_never_their_hashes(tmp_path):
    from webkit import user_entry

    entry = user_entry("alice")
    (tmp_path / "node.toml").write_text(f'[web]\nusers = ["{entry}"]\n')
    r = _cli("config", "--config", str(tmp_path / "node.toml"))
    assert r.returncode == 0 and json.loads(r.stdout)["web"]["users"] == ["alice:(hash not shown)"]
    assert entry.split(":", 1)[1] not in r.stdout


@needs_dcmtk
def test_status_worklist_prints_the_web_worklists_order_and_states_without_patient_identity(make_node, tmp_path):
    from nodekit import PATIENT_ID

    node = make_node([])
    files = phantom_series(tmp_path / "in", n_slices=12, rows=32)
    assert storescu(node.port, files).returncode == 0
    wait_until(lambda: [j for j in node.state.jobs() if j.state.value == "done"], 30, "job done")
    r = _cli("status", "--worklist", "--data-dir", str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    head, row = r.stdout.splitlines()
    assert head.split()[:5] == ["#", "PRIORITY", "PE", "STATE", "RECEIVED"]
    assert row.split()[:4] == ["1", "check", "0.00", "delivered"] and "no findings from the model" in row
    doc = json.loads(_cli("status", "--worklist", "--json", "--data-dir", str(tmp_path / "data")).stdout)
    assert doc["reading_order"] == ["critical", "urgent", "check", "routine"]
    assert [w["state"] for w in doc["worklist"]] == ["delivered"]
    assert PATIENT_ID not in r.stdout


@needs_dcmtk
def test_a_study_waiting_for_its_model_server_says_so_in_the_worklist_and_when_the_next_try_is(make_node, tmp_path):
    def server_away(ctx):
        raise BackendUnavailable("Triton server grpc://127.0.0.1:9: not reachable; the job runs again by itself")

    http = free_port()
    node = make_node([], run_job=server_away, **web_config(http, users=("alice",),
                                                          **{"worker.retry_unavailable_s": 600.0}))
    files = phantom_series(tmp_path / "in", n_slices=12, rows=32)
    r = storescu(node.port, files)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    (job,) = wait_until(lambda: [j for j in node.state.jobs() if j.deferred], 30, "the job deferred")
    c = WebClient(http)
    assert c.login("alice").status == 303
    assert "waiting for the model server" in c.get("/worklist").text
    page = c.get(f"/studies/{pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID}").text
    assert "The model server did not answer (1 try so far); the next try is at " in page
    assert time.strftime("%H:%M:%S", time.localtime(job.not_before)) in page and "BackendUnavailable" in page
