"""The remote engine against a real Triton server (tritonserver of nvidia-pytriton on loopback, serving the
repository `dicom-node-export triton` wrote for the demo bundle) through the real `tritonclient`:
predictions equal local onnxruntime on a phantom study over gRPC and HTTP, and the start checks refuse a
server that is down, a model that is not there, a repository of another bundle version and another graph."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dicom_node.imaging.preprocess import preprocess
from dicom_node.imaging.series import load_series
from dicom_node.model.bundle import default_bundle_path, load_bundle
from dicom_node.model.inference import InferenceError, Predictor
from dicom_node.model.triton import TritonPredictor, TritonSettings
from dicom_node.tools.pacs import free_port
from peers import start_triton

DEMO = default_bundle_path()


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    from dicom_node.tools.demo import DEMO_PHANTOM
    from dicom_node_phantoms import PhantomConfig, generate_study, study_seed, write_study

    root = tmp_path_factory.mktemp("ct")
    write_study(generate_study(study_seed(424242, 0), PhantomConfig(**DEMO_PHANTOM), kind="positive"), root)
    return preprocess(load_series(root), load_bundle(DEMO).manifest.preprocessing)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_predictions_through_triton_equal_local_onnxruntime_on_a_phantom_study(triton_server, triton_repo, windows,
                                                                                 protocol):
    local = Predictor(load_bundle(DEMO), providers=("CPUExecutionProvider",), batch_size=4).predict(windows)
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    remote = TritonPredictor(triton_repo.manifest, TritonSettings(url=url, protocol=protocol), batch_size=4)
    got = remote.predict(windows)
    assert windows.array.shape[0] > remote.batch_size, "stage 1 must take several requests"
    np.testing.assert_allclose(got.window_probs, local.window_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose([got.study_probs[k] for k in local.study_probs], list(local.study_probs.values()),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.attention, local.attention, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.heatmaps, local.heatmaps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.stage1_probs, local.stage1_probs, atol=1e-5, rtol=0)
    assert got.labels == local.labels and got.positive
    assert got.execution_provider == f"triton {protocol}://{url}"


def test_the_stage1_batch_is_capped_at_the_servers_max_batch_size(triton_server, triton_repo):
    p = TritonPredictor(triton_repo.manifest, TritonSettings(url=triton_server.grpc_url), batch_size=64, warmup=False)
    assert p.batch_size == 8


def test_a_server_that_is_down_refuses_the_start_naming_the_address_and_the_fix(triton_repo):
    port = free_port()
    with pytest.raises(InferenceError, match=rf"Triton server grpc://127.0.0.1:{port}: not reachable \(.*\); start "
                                             r"the server or fix inference.triton_url"):
        TritonPredictor(triton_repo.manifest, TritonSettings(url=f"127.0.0.1:{port}", timeout_s=2, wait_at_start=False))


def test_a_server_that_is_down_at_start_is_checked_when_a_prediction_first_needs_it(triton_repo, windows, tmp_path):
    from dicom_node.model.inference import BackendUnavailable

    server = start_triton(triton_repo, tmp_path / "triton")
    server.stop()
    p = TritonPredictor(triton_repo.manifest, TritonSettings(url=server.grpc_url, timeout_s=2))  # starts without it
    with pytest.raises(BackendUnavailable, match=r"not reachable"):
        p.predict(windows)  # the worker defers the job
    server.start()
    try:
        assert p.predict(windows).window_probs.shape == (len(windows.array),)  # checked, warmed up, run
    finally:
        server.stop()


def test_a_model_the_server_does_not_have_refuses_the_start(triton_server, triton_repo):
    with pytest.raises(InferenceError, match=r"model pe-other_stage1 is not ready .*set inference.triton_model"):
        TritonPredictor(triton_repo.manifest, TritonSettings(url=triton_server.grpc_url, model="pe-other"))


def _manifest_copy(tmp_path: Path, repo, **changes) -> Path:
    data = json.loads(repo.manifest.read_text())
    for key, value in changes.items():
        if key == "stage2_sha":
            data["files"][data["graphs"]["stage2"]["file"]] = value
        else:
            data[key] = value
    out = tmp_path / "other.manifest.json"
    out.write_text(json.dumps(data))
    return out


def test_a_served_repository_of_another_bundle_version_refuses_the_start(triton_server, triton_repo, tmp_path):
    other = _manifest_copy(tmp_path, triton_repo, version="9.9.9")
    # the node looks for the served models under the name of ITS bundle unless told otherwise
    with pytest.raises(InferenceError, match=r"model pe-demo-tiny-0.3.0_stage1 serves bundle_version '0.3.0' but "
                                             r"bundle pe-demo-tiny 9.9.9 .* has '9.9.9'"):
        TritonPredictor(other, TritonSettings(url=triton_server.grpc_url, model="pe-demo-tiny-0.3.0"))


def test_a_served_graph_other_than_the_manifests_refuses_the_start(triton_server, triton_repo, tmp_path):
    other = _manifest_copy(tmp_path, triton_repo, stage2_sha="0" * 64)
    with pytest.raises(InferenceError, match=r"model pe-demo-tiny-0.3.0_stage2 serves onnx_sha256 '[0-9a-f]{64}' but "
                                             r"bundle pe-demo-tiny 0.3.0 .* has '0{64}'"):
        TritonPredictor(other, TritonSettings(url=triton_server.http_url, protocol="http"))


def test_a_signature_other_than_the_manifests_refuses_the_start(triton_repo, tmp_path):
    """A repository whose stage-2 config was edited by hand (sequence length 32 instead of 40)."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(triton_repo.path, repo)
    cfg = repo / "pe-demo-tiny-0.3.0_stage2" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("dims: [ 40, 128 ]", "dims: [ 32, 128 ]"))
    edited = type(triton_repo)(path=repo, model=triton_repo.model, configs={}, manifest=repo / triton_repo.manifest.name)
    server = start_triton(edited, tmp_path / "server")
    try:
        with pytest.raises(InferenceError, match=r"model pe-demo-tiny-0.3.0_stage2 inputs are features FP32 "
                                                 r"\[-1, 32, 128\], mask FP32 \[-1, 40\]; bundle pe-demo-tiny 0.3.0 "
                                                 r"needs features FP32 \[-1, 40, 128\]"):
            TritonPredictor(edited.manifest, TritonSettings(url=server.grpc_url))
    finally:
        server.stop()


@pytest.mark.parametrize("key, value, says", [
    ("inference.engine", "tensorrt", "inference.engine: 'tensorrt' is not allowed; onnxruntime or triton"),
    ("inference.triton_protocol", "udp", "inference.triton_protocol: 'udp' is not allowed; grpc or http"),
    ("inference.triton_url", "grpc://triton:8001", "inference.triton_url: 'grpc://triton:8001' is not allowed; "
                                                   "HOST:PORT without a scheme"),
    ("inference.triton_timeout_s", 0, "inference.triton_timeout_s: 0.0 is not allowed; a number of seconds > 0"),
    ("inference.triton_cert", "/etc/client.pem", "inference.triton_key: '' is not allowed; set together with "
                                                 "inference.triton_cert"),
])
def test_bad_engine_settings_are_refused_naming_key_value_and_fix(key, value, says):
    from dicom_node.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, environ={}, overrides={"inference.engine": "triton", key: value})


def test_the_triton_engine_takes_the_repositorys_manifest_file_as_its_bundle(triton_repo):
    from dicom_node.config import load_config

    cfg = load_config(None, environ={}, overrides={"inference.engine": "triton",
                                                   "inference.bundle": str(triton_repo.manifest)})
    assert TritonSettings.from_config(cfg.inference) == TritonSettings()
    assert cfg.inference.bundle == str(triton_repo.manifest)


def test_grpc_over_mutual_tls_needs_the_ca_and_a_client_certificate(triton_repo, windows, tmp_path):
    from pki import self_signed

    paths, ca = self_signed(tmp_path / "pki")
    server = start_triton(triton_repo, tmp_path / "server", tls=(*paths["server"], ca))
    try:
        tls = TritonSettings(url=server.grpc_url, tls=True, ca=ca, cert=paths["client"][0], key=paths["client"][1],
                             timeout_s=5)
        pred = TritonPredictor(triton_repo.manifest, tls)
        assert pred.execution_provider == f"triton grpcs://{server.grpc_url}"
        local = Predictor(load_bundle(DEMO), providers=("CPUExecutionProvider",)).predict(windows)
        np.testing.assert_allclose(pred.predict(windows).window_probs, local.window_probs, atol=1e-5, rtol=0)
        with pytest.raises(InferenceError, match=r"grpcs://127.0.0.1:\d+: not reachable"):
            TritonPredictor(triton_repo.manifest, TritonSettings(url=server.grpc_url, tls=True, ca=ca, timeout_s=5))
        with pytest.raises(InferenceError, match=r"grpc://127.0.0.1:\d+: not reachable .*its port accepts connections, "
                                                 r"so the server is up and the client settings do not match it"):
            TritonPredictor(triton_repo.manifest, TritonSettings(url=server.grpc_url, timeout_s=5))  # no TLS
    finally:
        server.stop()


def test_version_names_the_bundle_of_the_manifest_copy_and_the_triton_server(triton_repo, tmp_path):
    from dicom_node.node_commands import version_text
    from nodekit import write_config

    cfg = write_config(tmp_path / "node.toml", **{"inference.engine": "triton", "inference.bundle":
                                                  str(triton_repo.manifest), "inference.triton_url": "gpu1:8001"})
    assert version_text(str(cfg)).splitlines()[1] == (f"model bundle: pe-demo-tiny 0.3.0 (inference.bundle "
                                                      f"{triton_repo.manifest}, run on Triton grpc://gpu1:8001)")


def test_a_shi_bundle_runs_through_triton_with_the_predictions_of_local_onnxruntime(triton_shi_repo,
                                                                                      tmp_path_factory):
    """The Shi et al. 2020 demo bundle: `dicom-node-export triton` writes its repository (stage 2 takes the whole
    study's slab feature maps, its scalar study logit reshaped like stage 1's window logit), the node's start
    checks pass, and a phantom study's PE probability, slab probabilities and heatmaps equal local onnxruntime."""
    from dicom_node.model import BUILTIN_BUNDLES
    from dicom_node.tools.demo import DEMO_PHANTOM
    from dicom_node_phantoms import PhantomConfig, generate_study, study_seed, write_study

    shi, repo = DEMO.parent / BUILTIN_BUNDLES["shi2020"], triton_shi_repo
    stage2 = (repo.path / f"{repo.model}_stage2" / "config.pbtxt").read_text()
    assert 'name: "features" data_type: TYPE_FP32 dims: [ 50, 128, 10, 10 ]' in stage2
    assert 'name: "study_logit" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] }' in stage2
    root = tmp_path_factory.mktemp("shi-ct")
    write_study(generate_study(study_seed(424242, 0), PhantomConfig(**DEMO_PHANTOM), kind="positive"), root)
    slabs = preprocess(load_series(root), load_bundle(shi).manifest.preprocessing)
    server = start_triton(repo, tmp_path_factory.mktemp("shi-tritonserver"))
    try:
        local = Predictor(load_bundle(shi), providers=("CPUExecutionProvider",), batch_size=4).predict(slabs)
        remote = TritonPredictor(repo.manifest, TritonSettings(url=server.grpc_url), batch_size=4)
        got = remote.predict(slabs)
    finally:
        server.stop()
    assert got.family == "shi2020" and slabs.array.shape[0] > remote.batch_size, "stage 1 must take several requests"
    assert got.pe_probability == pytest.approx(local.pe_probability, abs=1e-5)
    np.testing.assert_allclose(got.window_probs, local.window_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.heatmaps, local.heatmaps, atol=1e-5, rtol=0)
    assert got.labels == local.labels and np.array_equal(got.window_positive, local.window_positive)
    assert got.execution_provider == f"triton grpc://{server.grpc_url}"
