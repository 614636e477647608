"""Node processes with `[inference] engine = "triton"` against a real Triton server process (tritonserver of
nvidia-pytriton on loopback, `dicom_node.tools.triton_server`), dcmtk storescu as the scanners and dcmtk
storescp as the PACS:

* a node whose Triton server is down at start starts, receives, and delivers once the server answers
  (the start checks run then); with `triton_wait_at_start = false` it refuses to start, in one line;
* two nodes on different ports share one Triton: every study is delivered exactly once, its SR equal to
  the SR the same study gets from local onnxruntime (probabilities to 1e-5, the same key slices), and
  the server ran stage 2 exactly once per study;
* the server is killed while a job's request is in flight: the job is deferred (`job_deferred` naming
  the server and the cause, tried again with a doubling wait), nothing is delivered; with the server
  back the job runs by itself and the study is delivered exactly once;
* the same with `retry_unavailable_max = 0`: the job fails; with the server back, `dicom-node resend`
  runs it and the study is delivered exactly once;
* a node with the Shi et al. 2020 demo bundle on Triton delivers the SR local onnxruntime makes.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from dicom_node.durability.state import JobState, State
from dicom_node.model.bundle import default_bundle_path, load_bundle
from dicom_node.model.inference import Predictor
from dicom_node.pipeline import analyse_series
from dicom_node.results import ResultOptions
from dicom_node.tools.pacs import free_port
from nodekit import REPO, NodeProcess, phantom_series, storescu, wait_until, write_config
from peers import start_triton

pytestmark = [pytest.mark.dcmtk]

SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _node(workdir: Path, repo, server, dest, **cfg) -> NodeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return NodeProcess(workdir, destinations=[f"STORESCP@127.0.0.1:{dest.port}"], quiet=1.0, job=None, **{
        "inference.engine": "triton", "inference.bundle": str(repo.manifest), "inference.triton_url": server.grpc_url,
        "inference.batch_size": 2, "inference.triton_timeout_s": 20.0, "results.top_k_heatmaps": 1, **cfg})


def _srs(folder: Path) -> list[pydicom.Dataset]:
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            try:
                ds = pydicom.dcmread(f)
            except Exception:  # storescp is still writing it: the next poll reads it whole
                continue
            if str(ds.get("SOPClassUID", "")) == SR:
                out.append(ds)
    return out


def _content(ds: pydicom.Dataset) -> list[tuple[str, str, object]]:
    """Every content item of an SR as (value type, concept, value); NUM values as floats."""
    out: list[tuple[str, str, object]] = []
    for item in ds.get("ContentSequence", []):
        concept = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        vt = item.ValueType
        if vt == "NUM":
            value: object = float(item.MeasuredValueSequence[0].NumericValue)
        elif vt == "IMAGE":
            value = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif vt == "TEXT":
            value = str(item.TextValue)
        elif vt == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        else:
            value = None
        out.append((vt, concept, value))
        out += _content(item)
    return out


def _assert_same_sr(remote: pydicom.Dataset, local: pydicom.Dataset) -> None:
    a, b = _content(remote), _content(local)
    assert [(vt, c) for vt, c, _ in a] == [(vt, c) for vt, c, _ in b]
    for (vt, concept, va), (_, _, vb) in zip(a, b):
        if vt == "NUM":
            assert va == pytest.approx(vb, abs=1e-5), concept
        elif isinstance(va, str) and "execution_provider=" in va:
            assert "execution_provider=triton grpc://127.0.0.1:" in va  # the one line that says where it ran
        else:
            assert va == vb, (vt, concept)
    images = [v for vt, _, v in a if vt == "IMAGE"]
    assert images, "the SR references its key slices"


def test_with_triton_wait_at_start_off_a_node_whose_triton_server_is_down_refuses_to_start_in_one_line(
        triton_repo, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "node.toml", ae_title="PENODE", port=free_port(), data_dir=str(tmp_path / "data"),
                       **{"inference.engine": "triton", "inference.bundle": str(triton_repo.manifest),
                          "inference.triton_url": f"127.0.0.1:{port}", "inference.triton_timeout_s": 2.0,
                          "inference.triton_wait_at_start": False})
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"dicom-node serve: cannot start: Triton server grpc://127.0.0.1:{port}: not reachable")
    assert "fix inference.triton_url" in r.stderr


def test_a_node_started_while_its_triton_server_is_down_receives_and_delivers_once_the_server_is_up(
        triton_repo, storescp, tmp_path):
    server = start_triton(triton_repo, tmp_path / "triton")
    server.stop()  # its ports are kept: start() brings it back there
    node = _node(tmp_path / "node", triton_repo, server, storescp, **{"worker.retry_unavailable_s": 1.0}).start()
    try:
        (warning,) = [e for e in node.events() if e.get("event") == "triton_unavailable_at_start"]
        assert warning["level"] == "warning" and "not reachable" in warning["error"]
        files = phantom_series(tmp_path / "in", n_slices=60, rows=128, seed=52)
        r = storescu(node.port, files, aet="SCANNER")  # the node receives while the server is away
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        deferred = wait_until(lambda: [e for e in node.events() if e.get("event") == "job_deferred"], 60, "deferred")
        assert "not reachable" in deferred[0]["error"] and _srs(storescp.outdir) == []
        server.start()
        st = State(node.workdir / "data" / "state.sqlite")
        (job,) = wait_until(lambda: st.jobs(JobState.DONE), 120, "delivered once the server answers")
        _one_sr_of(storescp, files)
        loaded = [e for e in node.events() if e.get("event") == "model_loaded"]
        assert len(loaded) == 1 and loaded[0]["engine"] == "triton"  # the start checks ran when it first answered
        assert not [e for e in node.events() if e.get("event") == "job_failed"]
        st.close()
    finally:
        node.stop()
        server.stop()


def test_two_nodes_share_one_triton_and_deliver_every_study_exactly_once_with_the_local_sr(triton_repo, storescp,
                                                                                          tmp_path):
    server = start_triton(triton_repo, tmp_path / "triton")
    nodes = [_node(tmp_path / f"node{i}", triton_repo, server, storescp).start() for i in range(2)]
    try:
        assert nodes[0].port != nodes[1].port
        studies = [phantom_series(tmp_path / f"in{i}", n_slices=60, rows=128, seed=40 + i) for i in range(4)]
        senders = [subprocess.Popen(["/usr/bin/storescu", "-aet", "SCANNER", "-aec", "PENODE", "127.0.0.1",
                                     str(nodes[i % 2].port), *map(str, files)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for i, files in enumerate(studies)]
        for s in senders:  # all four studies arrive at the same time, two per node
            out, _ = s.communicate(timeout=120)
            assert s.returncode == 0 and "E:" not in out, out
        wait_until(lambda: len(_srs(storescp.outdir)) >= 4, 180, "four SRs delivered")
        for n in nodes:
            st = State(n.workdir / "data" / "state.sqlite")
            wait_until(lambda st=st: len(st.jobs(JobState.DONE)) == 2, 60, "both jobs of a node done")
            st.close()
        time.sleep(2.0)  # nothing more may follow
        srs = {str(ds.StudyInstanceUID): ds for ds in _srs(storescp.outdir)}
        assert len(_srs(storescp.outdir)) == 4 and len(srs) == 4, "exactly one SR per study"
        # the server ran stage 2 once per study (+ one warm-up per node start): no request was repeated
        counts = server.infer_counts()
        assert counts["pe-demo-tiny-0.3.0_stage2"] == 4 + 2, counts
        local = Predictor(load_bundle(default_bundle_path()), providers=("CPUExecutionProvider",))
        for files in studies:
            ref = analyse_series(files, local, ResultOptions(key_slices=1)).sr
            remote = srs[str(ref.StudyInstanceUID)]
            assert remote.SOPInstanceUID == ref.SOPInstanceUID  # deterministic UIDs: the same result object
            _assert_same_sr(remote, ref)
        for n in nodes:
            assert any(e.get("event") == "model_loaded" and e.get("engine") == "triton" for e in n.events())
    finally:
        for n in nodes:
            n.stop()
        server.stop()


def _kill_mid_job(triton_repo, storescp, tmp_path, **cfg):
    """A node whose Triton server is killed while the node's first job has a request in flight (each
    request takes 1.5 s inside the server); returns (server, node, the study's files)."""
    server = start_triton(triton_repo, tmp_path / "triton", env={"TRITON_TEST_DELAY_S": "1.5"})
    node = _node(tmp_path / "node", triton_repo, server, storescp, **cfg).start()
    files = phantom_series(tmp_path / "in", n_slices=60, rows=128, seed=51)
    r = storescu(node.port, files, aet="SCANNER")
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    wait_until(lambda: any(e.get("event") == "job_started" for e in node.events()), 60, "job started")
    time.sleep(0.5)
    server.kill()
    return server, node, files


def _one_sr_of(storescp, files) -> None:
    time.sleep(1.5)  # nothing more may follow
    srs = _srs(storescp.outdir)
    assert len(srs) == 1 and str(srs[0].StudyInstanceUID) == str(pydicom.dcmread(files[0]).StudyInstanceUID)


def test_a_server_killed_mid_job_defers_the_job_which_is_delivered_once_by_itself_when_the_server_is_back(
        triton_repo, storescp, tmp_path):
    mport = free_port()
    server, node, files = _kill_mid_job(triton_repo, storescp, tmp_path,
                                        **{"worker.retry_unavailable_s": 1.0, "metrics_port": mport})
    try:
        def deferred():
            return [e for e in node.events() if e.get("event") == "job_deferred"]

        first = wait_until(deferred, 60, "job deferred")[0]
        assert first["level"] == "warning" and (first["attempt"], first["tries"], first["retry_in_s"]) == (1, 11, 1.0)
        assert first["error"].startswith("BackendUnavailable: Triton server grpc://")
        assert "request to model pe-demo-tiny-0.3.0_stage" in first["error"] and "runs again by itself" in first["error"]
        st = State(node.workdir / "data" / "state.sqlite")
        (job,) = st.jobs()
        second = wait_until(lambda: deferred()[1:], 60, "a second try, deferred again")[0]
        assert (second["attempt"], second["retry_in_s"]) == (2, 2.0)  # the wait doubles
        assert "does not answer a liveness request" in second["error"]  # checked before loading the series
        assert st.job(job.id).state is JobState.QUEUED and "Triton server" in (st.job(job.id).error or "")
        assert _srs(storescp.outdir) == [] and not [e for e in node.events() if e.get("event") == "job_failed"]
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            assert "\ndicom_node_jobs_waiting_for_backend 1.0\n" in r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=10) as r:
            assert r.status == 200  # the node still receives; restarting it would not bring the server back

        server.start()  # back on the same ports: the job's next try finds it, no command needed
        wait_until(lambda: st.job(job.id).state is JobState.DONE, 120, "the deferred job done by itself")
        _one_sr_of(storescp, files)
        assert [j.state for j in st.jobs()] == [JobState.DONE] and st.job(job.id).attempts >= 3
        assert not [e for e in node.events() if e.get("event") == "job_failed"]
        st.close()
    finally:
        node.stop()
        server.stop()


def test_with_no_retries_a_killed_server_fails_the_job_and_resend_delivers_it_once_when_the_server_is_back(
        triton_repo, storescp, tmp_path):
    server, node, files = _kill_mid_job(triton_repo, storescp, tmp_path, **{"worker.retry_unavailable_max": 0})
    try:
        failed = wait_until(lambda: [e for e in node.events() if e.get("event") == "job_failed"], 60, "job failed")
        assert failed[0]["error"].startswith("BackendUnavailable: Triton server grpc://")
        assert "request to model pe-demo-tiny-0.3.0_stage" in failed[0]["error"] and "resend" in failed[0]["error"]
        st = State(node.workdir / "data" / "state.sqlite")
        # the worker logs job_failed, then records the state
        (job,) = wait_until(lambda: st.jobs(JobState.FAILED), 30, "job recorded as failed")
        assert len(st.jobs()) == 1 and "Triton server" in (job.error or "")
        assert _srs(storescp.outdir) == []

        server.start()  # back on the same ports
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "resend", str(job.id), "--config",
                            str(node.config)], capture_output=True, text=True, timeout=60, env=node.env)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: st.job(job.id).state is JobState.DONE, 120, "re-run job done")
        _one_sr_of(storescp, files)
        assert [j.state for j in st.jobs()] == [JobState.DONE]
        st.close()
    finally:
        node.stop()
        server.stop()


def test_a_node_with_a_shi_bundle_on_triton_delivers_the_sr_local_onnxruntime_makes(triton_shi_repo, storescp, tmp_path):
    from dicom_node.model import BUILTIN_BUNDLES

    server = start_triton(triton_shi_repo, tmp_path / "triton")
    node = _node(tmp_path / "node", triton_shi_repo, server, storescp).start()
    try:
        files = phantom_series(tmp_path / "in", n_slices=60, rows=128, seed=41)
        r = storescu(node.port, files, aet="SCANNER")
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: _srs(storescp.outdir), 180, "the SR delivered")
        _one_sr_of(storescp, files)
        shi = default_bundle_path().parent / BUILTIN_BUNDLES["shi2020"]
        local = Predictor(load_bundle(shi), providers=("CPUExecutionProvider",))
        ref = analyse_series(files, local, ResultOptions(key_slices=1)).sr
        (remote,) = _srs(storescp.outdir)
        assert remote.SOPInstanceUID == ref.SOPInstanceUID
        _assert_same_sr(remote, ref)
        finished = [e for e in node.events() if e.get("event") == "inference_finished"]
        assert finished and finished[0]["family"] == "shi2020"
        assert finished[0]["provider"] == f"triton grpc://{server.grpc_url}"
    finally:
        node.stop()
        server.stop()
