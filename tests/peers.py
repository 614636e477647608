"""Real DICOM peers for tests: re-exported from `dicom_node.tools.pacs` (also used by the demo and benchmarks)."""

from dicom_node.tools.pacs import *  # noqa: F401,F403
from dicom_node.tools.pacs import DCMTK_BIN, ORTHANC_BIN, OrthancPeer, StoreScpPeer, free_port, terminate, wait_for_port  # noqa: F401
