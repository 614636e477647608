"""A real NVIDIA Triton Inference Server on loopback, from the `nvidia-pytriton` wheel, for tests and benchmarks.

The wheel ships Triton's `tritonserver` binary (2.51 for PyTriton 0.7.0), its shared libraries and the
Python backend, but not the ONNX Runtime backend of the official container. `TritonServerPeer` takes a
repository written by `dicom-node-export triton`, copies it with each config switched to the Python
backend (instances on the CPU, no GPU accelerator; everything else, names, dims, batching, parameters,
exactly as exported) and `dicom_node.tools.triton_onnx_backend` as each version's `model.py`, and runs
the binary as its own process on 127.0.0.1 with free HTTP and gRPC ports. The node talks to it with
the real `tritonclient`, exactly as to the official container.

The binary runs from the virtualenv `scripts/setup.sh` makes (`.venv-triton`, Debian's
`/usr/bin/python3.11`: the backend stub embeds a shared `libpython3.11`, which the pyenv interpreter
lacks). `triton_venv()` finds it (`TRITON_VENV` overrides) and says why not when it is absent.

`stop()` asks for a clean exit (SIGTERM, `--exit-timeout-secs 2`), `kill()` ends the process at once (a
crash); `start()` again brings it back on the same ports and waits until both models are ready.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.tools.pacs import free_port, terminate

__all__ = ["TritonServerPeer", "triton_venv", "TritonUnavailable"]

_ROOT = Path(__file__).resolve().parents[2]
_STUB_PY = "3.11"


class TritonUnavailable(RuntimeError):
    """No usable Triton server binary on this machine (the message says what is missing and how to get it)."""


def triton_venv() -> Path:
    """The virtualenv with nvidia-pytriton (`TRITON_VENV`, else `.venv-triton` in the checkout); raises
    `TritonUnavailable` naming what is missing."""
    venv = Path(os.environ.get("TRITON_VENV") or _ROOT / ".venv-triton")
    site = venv / "lib" / f"python{_STUB_PY}" / "site-packages"
    binary = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonUnavailable(f"no Triton server binary at {binary}: run scripts/setup.sh (it makes {venv.name} "
                                "from /usr/bin/python3.11 with nvidia-pytriton), or set TRITON_VENV")
    return venv


def _site(venv: Path) -> Path:
    return venv / "lib" / f"python{_STUB_PY}" / "site-packages"


def _python_backend_repository(repo: Path, out: Path) -> list[str]:
    """Copy the exported repository `repo` to `out` for the Python backend; returns the model names."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    backend_model = Path(__file__).with_name("triton_onnx_backend.py")
    models = []
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        cfg = text_format.Parse(cfg_path.read_text(), model_config_pb2.ModelConfig())
        cfg.backend = "python"
        cfg.ClearField("optimization")  # TensorRT is a GPU accelerator of the ONNX Runtime backend
        for group in cfg.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
            del group.gpus[:]
        dst = out / cfg_path.parent.name
        dst.mkdir(parents=True)
        (dst / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        for version in cfg_path.parent.iterdir():
            if version.is_dir() and version.name.isdigit():
                (dst / version.name).mkdir()
                shutil.copyfile(version / "model.onnx", dst / version.name / "model.onnx")
                shutil.copyfile(backend_model, dst / version.name / "model.py")
        models.append(cfg.name)
    if not models:
        raise TritonUnavailable(f"{repo} has no */config.pbtxt; write it with dicom-node-export triton")
    return models


@dataclass
class TritonServerPeer:
    """`tritonserver` serving an exported repository through the Python backend (see the module docstring).

    `env` adds environment variables for the server and its backend stubs (e.g. `TRITON_TEST_DELAY_S`).
    """

    repo: Path
    workdir: Path
    http_port: int = 0
    grpc_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    #: (server cert, server key, CA): gRPC over mutual TLS (clients need a certificate signed by the CA)
    tls: tuple[str, str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    models: list[str] = field(default_factory=list)
    starts: int = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    def _prepare(self) -> Path:
        venv = triton_venv()
        site = _site(venv)
        server = self.workdir / "server"
        if not server.exists():
            # the backend directory needs the stub for this interpreter beside libtriton_python.so
            dist = site / "pytriton" / "tritonserver"
            backend = server / "backends" / "python"
            backend.mkdir(parents=True)
            for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
                os.symlink(dist / "backends" / "python" / f, backend / f)
            os.symlink(dist / "python_backend_stubs" / _STUB_PY / "triton_python_backend_stub",
                       backend / "triton_python_backend_stub")
        models = self.workdir / "models"
        if not models.exists():
            self.models = _python_backend_repository(self.repo, models)
        return venv

    def start(self, timeout: float = 90.0) -> TritonServerPeer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        venv = self._prepare()
        site = _site(venv)
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.starts += 1
        cmd = [str(site / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
               f"--model-repository={self.workdir / 'models'}", f"--backend-directory={self.workdir / 'server' / 'backends'}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false", "--exit-timeout-secs=2",
               # a private shared-memory prefix: two servers (or two starts) on one host must not share regions
               f"--backend-config=python,shm-region-prefix-name=dnt{os.getpid()}x{self.grpc_port}x{self.starts}"]
        if self.tls:
            cert, key, ca = self.tls
            cmd += ["--grpc-use-ssl-mutual=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}",
                    f"--grpc-root-cert={ca}"]
        env = {**os.environ, **self.env,
               "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"),
               "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(site),
               "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": self.env.get("OMP_NUM_THREADS", "1")}
        env.pop("PYTHONHOME", None)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited with {self.proc.returncode}; last log lines:\n"
                                        + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:]))
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        terminate(self.proc, 20)
        self._reap_stubs()

    def kill(self) -> None:
        """End the server at once, as a crash would (its backend stubs go with it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reap_stubs()

    def _reap_stubs(self) -> None:
        # the backend stubs are in the server's own session (start_new_session): end any left behind
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def infer_counts(self) -> dict[str, int]:
        """Successful inference requests per model so far (Triton's statistics extension, over HTTP)."""
        import json

        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/stats", timeout=5) as r:
            stats: dict[str, Any] = json.load(r)
        return {s["name"]: int(s["inference_stats"]["success"]["count"]) for s in stats.get("model_stats", [])}
