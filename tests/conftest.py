"""Shared fixtures: real peers on loopback."""

from __future__ import annotations

import sys

import pytest

from peers import DCMTK_BIN, ORTHANC_BIN, OrthancPeer, StoreScpPeer, needs_dcmtk, needs_orthanc, start_triton  # noqa: F401 (re-exported)


@pytest.fixture
def orthanc(tmp_path_factory):
    """A fresh real Orthanc per test (own storage, own ports)."""
    if ORTHANC_BIN is None:
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc")).start()
    yield peer
    peer.stop()


@pytest.fixture
def storescp(tmp_path_factory):
    if DCMTK_BIN is None:
        pytest.skip("dcmtk not installed (apt-get install dcmtk)")
    peer = StoreScpPeer(tmp_path_factory.mktemp("storescp")).start()
    yield peer
    peer.stop()


@pytest.fixture
def make_node(tmp_path):
    """Start in-process nodes running the `nodekit.sc_job` stand-in job (or `run_job=`); JSON log to tmp_path/node.log."""
    from dicom_node.config import load_config
    from dicom_node.engine.node import Node
    from dicom_node.log import configure_logging
    from nodekit import sc_job

    nodes = []
    log_file = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log_file)

    def make(destinations, *, run_job=sc_job, **overrides) -> Node:
        base = {"port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 0.5,
                "min_free_disk_mb": 0, "destinations": destinations, "retry.base_delay_s": 0.2, "retry.max_delay_s": 0.5}
        node = Node(load_config(None, overrides={**base, **overrides}, environ={}), run_job=run_job).start()
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.stop()
    configure_logging(json=True, level="INFO", stream=sys.__stderr__)
    log_file.close()


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory):
    """The demo bundle exported by `dicom-node-export triton` (max batch 8), shared by the Triton tests."""
    from dicom_node.model.bundle import default_bundle_path
    from dicom_node_export.triton import TritonRepoOptions, write_triton_repository

    return write_triton_repository(default_bundle_path(), tmp_path_factory.mktemp("triton") / "repo",
                                   TritonRepoOptions(max_batch=8))


@pytest.fixture(scope="session")
def triton_shi_repo(tmp_path_factory):
    """The Shi et al. 2020 demo bundle (`builtin:shi2020`) exported by `dicom-node-export triton` (max batch 8)."""
    from dicom_node.model import BUILTIN_BUNDLES
    from dicom_node.model.bundle import default_bundle_path
    from dicom_node_export.triton import TritonRepoOptions, write_triton_repository

    return write_triton_repository(default_bundle_path().parent / BUILTIN_BUNDLES["shi2020"],
                                   tmp_path_factory.mktemp("triton-shi") / "repo", TritonRepoOptions(max_batch=8))


@pytest.fixture(scope="module")
def triton_server(triton_repo, tmp_path_factory):
    """One Triton server per test module; tests that stop or kill a server start their own (`start_triton`)."""
    peer = start_triton(triton_repo, tmp_path_factory.mktemp("tritonserver"))
    yield peer
    peer.stop()
