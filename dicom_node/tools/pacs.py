"""Receiving PACS peers on loopback: a real Orthanc, dcmtk storescp, or our own storage SCP.

Each external peer is a real process started with its own temporary configuration and
OS-chosen free ports; `stop()` ends it. `LocalStorageScp` is a small pynetdicom storage SCP
used by the demo when Orthanc is not installed. Used by the demo, the benchmarks and the
pytest fixtures (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["free_port", "wait_for_port", "terminate", "OrthancPeer", "StoreScpPeer", "LocalStorageScp", "ORTHANC_BIN", "DCMTK_BIN"]

ORTHANC_BIN = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DCMTK_BIN = Path("/usr/bin") if Path("/usr/bin/storescu").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


def terminate(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """End a peer process: SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class OrthancPeer:
    """A real Orthanc server with a private storage folder and a modality entry for the node."""

    workdir: Path
    aet: str = "ORTHANC"
    node_aet: str = "PENODE"
    node_port: int = 11112
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OrthancPeer:
        if ORTHANC_BIN is None:
            raise RuntimeError("Orthanc is not installed (Debian package 'orthanc')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        config = {
            "Name": "test-orthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"node": [self.node_aet, "127.0.0.1", self.node_port]},
            "Plugins": [],
            "StableAge": 2,
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, proc=self.proc)
        wait_for_port(self.dicom_port, proc=self.proc)
        return self

    def stop(self) -> None:
        terminate(self.proc)

    # --- REST helpers -------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        """GET `path` of the REST API: the decoded JSON when the answer is JSON, else the raw bytes."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body: bytes | dict[str, Any]) -> Any:
        """POST `body` (bytes as is, a dict as JSON) to `path`: the decoded JSON answer, else the raw bytes."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            out = r.read()
        return json.loads(out) if out[:1] in (b"{", b"[") else out

    def instances(self) -> list[str]:
        return self.get("/instances")

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def find_by_modality(self, modality: str) -> list[dict[str, Any]]:
        return [t for t in (self.instance_tags(i) for i in self.instances()) if t.get("Modality") == modality]

    def wait_for_instances(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """Poll until predicate(list of simplified tags) is true; return the tags.

        Parameters
        ----------
        predicate
            Called with the simplified tags of every instance Orthanc holds (one dict per instance,
            as `instance_tags` returns them); polling stops when it returns True.
        timeout
            Seconds before `TimeoutError`.
        """
        deadline = time.monotonic() + timeout
        tags: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            tags = [self.instance_tags(i) for i in self.instances()]
            if predicate(tags):
                return tags
            time.sleep(0.25)
        raise TimeoutError(f"Orthanc condition not met after {timeout:.0f} s; it holds {len(tags)} instances")


@dataclass
class StoreScpPeer:
    """dcmtk storescp writing what it receives into a folder."""

    outdir: Path
    aet: str = "STORESCP"
    port: int = 0
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] | None = None  # the process environment (None: inherited), e.g. TCP_NODELAY=1
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreScpPeer:
        if DCMTK_BIN is None:
            raise RuntimeError("dcmtk is not installed (Debian package 'dcmtk')")
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            [str(DCMTK_BIN / "storescp"), "-aet", self.aet, "-od", str(self.outdir), *self.extra_args, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        terminate(self.proc)


@dataclass
class LocalStorageScp:
    """A minimal storage SCP of our own (pynetdicom) that writes what it receives into a folder.

    Accepts SR, Secondary Capture, KOS and CT storage; used as the receiving PACS when Orthanc
    is not installed.
    """

    outdir: Path
    aet: str = "DEMOPACS"
    port: int = 0
    _server: ThreadedAssociationServer | None = None

    def start(self) -> LocalStorageScp:
        from pynetdicom import AE, StoragePresentationContexts, evt

        self.outdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()

        def on_store(event: Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(self.outdir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        ae = AE(ae_title=self.aet)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def files(self) -> list[Path]:
        return sorted(self.outdir.glob("*.dcm"))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
