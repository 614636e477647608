"""The real peers start and answer (so a broken install fails loudly, not as skips)."""

import os
import subprocess

from peers import DCMTK_BIN, ORTHANC_BIN


def test_tools_installed_in_ci():
    if os.environ.get("CI") == "true":
        assert ORTHANC_BIN and DCMTK_BIN, "CI must have orthanc and dcmtk installed by scripts/setup.sh"


def test_orthanc_and_storescp_answer_echo(orthanc, storescp):
    assert orthanc.get("/system")["DicomAet"] == "ORTHANC"
    for aet, port in (("ORTHANC", orthanc.dicom_port), ("STORESCP", storescp.port)):
        out = subprocess.run([str(DCMTK_BIN / "echoscu"), "-aec", aet, "127.0.0.1", str(port)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
