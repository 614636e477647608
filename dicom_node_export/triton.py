"""A verified model bundle -> an NVIDIA Triton Inference Server model repository (`dicom-node-export triton`).

Layout written under REPO (`<model>` = `triton_model_name(manifest)`: the bundle's `<name>-<version>`,
so two bundle versions sit side by side in one repository; `--model-name` overrides it):

    REPO/<model>_stage1/config.pbtxt      ONNX Runtime backend, dims/dtypes from the manifest's graph spec
    REPO/<model>_stage1/1/model.onnx      the bundle's stage1.onnx, byte for byte
    REPO/<model>_stage2/config.pbtxt
    REPO/<model>_stage2/1/model.onnx
    REPO/<model>.manifest.json            the bundle's manifest: what the node reads (`inference.bundle`)

Each config has dynamic batching (preferred batch = `max_batch`), `instances` instances per GPU (or
on the CPU), optionally the TensorRT execution accelerator (FP16 when asked, engines cached on disk
so a restart does not rebuild them), and `parameters` naming the bundle version, model UID and the
sha256 of the graph it serves: the node compares them with its manifest at start
(`dicom_node.model.triton`). A file at the repository's top level is not a model to Triton (it loads
sub-directories only), so the manifest copy does not disturb the server.

Every written config is parsed into Triton's own `ModelConfig` protobuf (`tritonclient`, the
`[triton]` extra) before anything is moved into place; without `tritonclient` the export refuses.
The repository is assembled in a temporary sibling directory and its model directories moved in.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.model.bundle import MANIFEST_NAME, Bundle, GraphSpec, load_bundle
from dicom_node.model.triton import (
    PARAM_BUNDLE_NAME,
    PARAM_BUNDLE_VERSION,
    PARAM_MODEL_UID,
    PARAM_ONNX_SHA256,
    PARAM_STAGE,
    STAGES,
    triton_datatype,
    triton_dims,
    triton_model_name,
)

__all__ = ["TritonRepoOptions", "TritonRepo", "write_triton_repository", "parse_model_config", "TritonExportError"]

#: where the official container keeps TensorRT engines unless told otherwise (a volume in docker/compose.triton.yaml)
DEFAULT_TRT_CACHE = "/trt-cache"


class TritonExportError(ValueError):
    """The repository cannot be written; the message names the option or file and the fix."""


@dataclass(frozen=True)
class TritonRepoOptions:
    """How the models are served: `max_batch` (also the preferred dynamic batch), `instances` per device,
    `kind` "gpu" or "cpu", `tensorrt` (TensorRT accelerator of the ONNX Runtime backend) with `fp16`,
    `trt_cache` (engine cache directory inside the server), `model_name` (empty = `<name>-<version>`),
    `version` (the Triton version directory), `queue_delay_us` (longest wait for a fuller batch)."""

    max_batch: int = 8
    instances: int = 1
    kind: str = "gpu"
    tensorrt: bool = False
    fp16: bool = False
    trt_cache: str = DEFAULT_TRT_CACHE
    model_name: str = ""
    version: int = 1
    queue_delay_us: int = 2000

    def check(self) -> None:
        if not 1 <= self.max_batch <= 1024:
            raise TritonExportError(f"--max-batch {self.max_batch}; expected 1-1024")
        if not 1 <= self.instances <= 64:
            raise TritonExportError(f"--instances {self.instances}; expected 1-64")
        if self.kind not in ("gpu", "cpu"):
            raise TritonExportError(f"--kind {self.kind!r}; expected gpu or cpu")
        if self.fp16 and not self.tensorrt:
            raise TritonExportError("--fp16 needs --tensorrt (FP16 is the TensorRT accelerator's precision mode; "
                                    "the graphs' inputs and outputs stay float32)")
        if self.tensorrt and self.kind != "gpu":
            raise TritonExportError("--tensorrt needs --kind gpu (TensorRT runs on NVIDIA GPUs only)")
        if self.version < 1:
            raise TritonExportError(f"--model-version {self.version}; expected an integer >= 1")
        if self.queue_delay_us < 0:
            raise TritonExportError(f"--queue-delay-us {self.queue_delay_us}; expected >= 0")


@dataclass(frozen=True)
class TritonRepo:
    """What was written: the repository, the model name prefix, the config per stage and the manifest copy."""

    path: Path
    model: str
    configs: dict[str, Path] = field(default_factory=dict)
    manifest: Path = Path()


def _tensor_block(spec_list: Any, *, reshape_scalar: bool) -> str:
    rows = []
    for s in spec_list:
        dims = triton_dims(s)
        extra = " reshape: { shape: [ ] }" if reshape_scalar and len(s.shape) == 1 else ""
        rows.append(f'  {{ name: "{s.name}" data_type: TYPE_{triton_datatype(s)} dims: [ {", ".join(map(str, dims))} ]{extra} }}')
    return ",\n".join(rows)


def model_config_text(bundle: Bundle, stage: str, graph: GraphSpec, name: str, o: TritonRepoOptions) -> str:
    """The config.pbtxt of one stage (protobuf text format of Triton's `ModelConfig`)."""
    m = bundle.manifest
    kind = "KIND_GPU" if o.kind == "gpu" else "KIND_CPU"
    params = {PARAM_BUNDLE_NAME: m.name, PARAM_BUNDLE_VERSION: m.version, PARAM_MODEL_UID: m.model_uid,
              PARAM_ONNX_SHA256: m.files[graph.file], PARAM_STAGE: stage}
    lines = [
        f"# {stage} of bundle {m.name} {m.version} (model UID {m.model_uid}); written by dicom-node-export triton.",
        "# The node checks the parameters below against its manifest at start: edit the bundle, not this file.",
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {o.max_batch}",
        f"version_policy: {{ specific: {{ versions: [ {o.version} ] }} }}",
        "input [",
        _tensor_block(graph.inputs, reshape_scalar=False),
        "]",
        "output [",
        _tensor_block(graph.outputs, reshape_scalar=True),
        "]",
        "# requests of several nodes (and stage-1 batches of one study) are merged up to the preferred size",
        f"dynamic_batching {{ preferred_batch_size: [ {o.max_batch} ] max_queue_delay_microseconds: {o.queue_delay_us} }}",
        f"instance_group [ {{ count: {o.instances} kind: {kind} }} ]",
    ]
    if o.tensorrt:
        cache = f"{o.trt_cache.rstrip('/')}/{name}"
        trt = [("precision_mode", "FP16" if o.fp16 else "FP32"), ("max_workspace_size_bytes", str(1 << 30)),
               ("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", cache)]
        lines += [
            "# TensorRT inside the ONNX Runtime backend; engines are built on first use and cached (keep the cache",
            "# directory on a volume: building them takes minutes)",
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
            '  name: "tensorrt"',
            *[f'  parameters {{ key: "{k}" value: "{v}" }}' for k, v in trt],
            "} ] } }",
        ]
    lines += [f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()]
    return "\n".join(lines) + "\n"


def parse_model_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse config.pbtxt text into Triton's `ModelConfig` protobuf (from `tritonclient`); `TritonExportError`
    naming `where` and the parser's message when it does not parse."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise TritonExportError(f"checking {where} needs tritonclient ({exc}); install the [triton] extra: "
                                "pip install -c constraints.txt 'dicom-node-pe[triton]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonExportError(f"{where} does not parse as Triton's ModelConfig: {exc}") from None


def write_triton_repository(bundle_path: str | Path, out: str | Path, options: TritonRepoOptions = TritonRepoOptions(),
                            *, force: bool = False) -> TritonRepo:
    """Write (or add to) the model repository `out` for the bundle at `bundle_path` (verified as the node does).

    An existing model directory of the same name is refused unless `force` (then replaced)."""
    options.check()
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    model = options.model_name or triton_model_name(m)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TritonExportError(f"--out {out} is a file; give a repository directory")
    names = {stage: f"{model}_{stage}" for stage in STAGES}
    clash = [n for n in names.values() if (out / n).exists()]
    if clash and not force:
        raise TritonExportError(f"repository {out} already has {', '.join(clash)}; export under another "
                                "--model-name, or add --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".triton-", dir=out))
    try:
        configs = {}
        for stage, graph in (("stage1", m.stage1), ("stage2", m.stage2)):
            d = tmp / names[stage]
            (d / str(options.version)).mkdir(parents=True)
            shutil.copyfile(bundle.file(graph.file), d / str(options.version) / "model.onnx")
            text = model_config_text(bundle, stage, graph, names[stage], options)
            cfg = parse_model_config(text, f"{names[stage]}/config.pbtxt")
            if cfg.name != names[stage] or cfg.max_batch_size != options.max_batch:
                raise TritonExportError(f"{names[stage]}/config.pbtxt parsed to name {cfg.name!r}, "
                                        f"max_batch_size {cfg.max_batch_size}; this is a bug of the export")
            (d / "config.pbtxt").write_text(text, encoding="utf-8")
            configs[stage] = out / names[stage] / "config.pbtxt"
        manifest = out / f"{model}.manifest.json"
        shutil.copyfile(bundle.path / MANIFEST_NAME, tmp / manifest.name)
        for stage in STAGES:
            if (out / names[stage]).exists():
                shutil.rmtree(out / names[stage])
            (tmp / names[stage]).rename(out / names[stage])
        (tmp / manifest.name).replace(manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TritonRepo(path=out, model=model, configs=configs, manifest=manifest)
