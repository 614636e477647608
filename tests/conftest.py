"""Shared fixtures: real peers on loopback."""

from __future__ import annotations

import pytest

from peers import DCMTK_BIN, ORTHANC_BIN, OrthancPeer, StoreScpPeer

needs_orthanc = pytest.mark.skipif(ORTHANC_BIN is None, reason="Orthanc not installed (apt-get install orthanc)")
needs_dcmtk = pytest.mark.skipif(DCMTK_BIN is None, reason="dcmtk not installed (apt-get install dcmtk)")


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
