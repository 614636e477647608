"""Real DICOM peers for tests: re-exported from `dicom_node.tools.pacs` (also used by the demo and benchmarks)."""

import pytest

from dicom_node.tools.pacs import *  # noqa: F401,F403
from dicom_node.tools.pacs import DCMTK_BIN, ORTHANC_BIN, OrthancPeer, StoreScpPeer, free_port, terminate, wait_for_port  # noqa: F401

#: skip marks for tests that need the Debian peers (import them from here: `conftest` is ambiguous once a
#: sub-folder's own conftest.py has been imported, as tests/results/ has)
needs_orthanc = pytest.mark.skipif(ORTHANC_BIN is None, reason="Orthanc not installed (apt-get install orthanc)")
needs_dcmtk = pytest.mark.skipif(DCMTK_BIN is None, reason="dcmtk not installed (apt-get install dcmtk)")
