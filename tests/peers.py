"""Real peers for tests: the DICOM peers re-exported from `dicom_node.tools.pacs` (also used by the demo and
benchmarks), and a real Triton Inference Server (`dicom_node.tools.triton_server`, also used by
benchmarks/triton.py)."""

import pytest

from dicom_node.tools.pacs import *  # noqa: F401,F403
from dicom_node.tools.pacs import DCMTK_BIN, ORTHANC_BIN, OrthancPeer, StoreScpPeer, free_port, terminate, wait_for_port  # noqa: F401


def start_triton(repo, workdir, **kw):
    """A real tritonserver (nvidia-pytriton) serving the exported repository `repo` (a `TritonRepo`); skips with
    the reason when this machine has none (scripts/setup.sh makes .venv-triton, so CI never skips)."""
    import pytest

    from dicom_node.tools.triton_server import TritonServerPeer, TritonUnavailable, triton_venv

    try:
        triton_venv()
    except TritonUnavailable as e:
        pytest.skip(str(e))
    return TritonServerPeer(repo.path, workdir, **kw).start()


#: skip marks for tests that need the Debian peers (import them from here: `conftest` is ambiguous once a
#: sub-folder's own conftest.py has been imported, as tests/results/ has)
needs_orthanc = pytest.mark.skipif(ORTHANC_BIN is None, reason="Orthanc not installed (apt-get install orthanc)")
needs_dcmtk = pytest.mark.skipif(DCMTK_BIN is None, reason="dcmtk not installed (apt-get install dcmtk)")
