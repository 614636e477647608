"""`dicom-node-export triton`: the model repository's layout, and every config.pbtxt parsed into Triton's own
`ModelConfig` protobuf (tritonclient) with the names, dims, dtypes, batching and parameters of the bundle."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from dicom_node.model.bundle import default_bundle_path, load_bundle, load_manifest_only
from dicom_node.model.triton import triton_dims
from dicom_node_export.cli import main

DEMO = default_bundle_path()
ModelConfig = model_config_pb2.ModelConfig


def _parsed(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), ModelConfig())


def test_the_repository_has_both_stages_their_graphs_and_the_manifest_copy(tmp_path, capsys):
    assert main(["triton", str(DEMO), "--out", str(tmp_path / "repo"), "--max-batch", "16", "--instances", "2"]) == 0
    m = load_bundle(DEMO).manifest
    model = f"{m.name}-{m.version}"
    repo = tmp_path / "repo"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == [
        f"{model}.manifest.json", f"{model}_stage1/1/model.onnx", f"{model}_stage1/config.pbtxt",
        f"{model}_stage2/1/model.onnx", f"{model}_stage2/config.pbtxt"]
    assert (repo / f"{model}_stage1/1/model.onnx").read_bytes() == (DEMO / m.stage1.file).read_bytes()
    assert (repo / f"{model}_stage2/1/model.onnx").read_bytes() == (DEMO / m.stage2.file).read_bytes()
    assert json.loads((repo / f"{model}.manifest.json").read_text()) == json.loads((DEMO / "manifest.json").read_text())
    assert load_manifest_only(repo / f"{model}.manifest.json").manifest == m
    assert f"{model}_stage1 and {model}_stage2" in capsys.readouterr().out


def test_every_config_parses_into_model_config_with_the_bundles_signature_batching_and_parameters(tmp_path):
    assert main(["triton", str(DEMO), "--out", str(tmp_path), "--max-batch", "16", "--instances", "2"]) == 0
    m = load_bundle(DEMO).manifest
    for stage, graph in (("stage1", m.stage1), ("stage2", m.stage2)):
        cfg = _parsed(next(tmp_path.glob(f"*_{stage}/config.pbtxt")))
        assert cfg.name == f"{m.name}-{m.version}_{stage}" and cfg.backend == "onnxruntime"
        assert cfg.max_batch_size == 16 and list(cfg.version_policy.specific.versions) == [1]
        assert [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in cfg.input] == \
            [(t.name, "TYPE_FP32", triton_dims(t)) for t in graph.inputs]
        assert [(t.name, tuple(t.dims)) for t in cfg.output] == [(t.name, triton_dims(t)) for t in graph.outputs]
        assert list(cfg.dynamic_batching.preferred_batch_size) == [16]
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params == {"bundle_name": m.name, "bundle_version": m.version, "model_uid": m.model_uid,
                          "onnx_sha256": m.files[graph.file], "stage": stage}
        assert not cfg.HasField("optimization")
    s1 = _parsed(next(tmp_path.glob("*_stage1/config.pbtxt")))
    (logit,) = [t for t in s1.output if t.name == "window_logit"]
    assert list(logit.dims) == [1] and logit.HasField("reshape") and list(logit.reshape.shape) == []


def test_tensorrt_fp16_puts_the_accelerator_with_an_engine_cache_per_model_into_the_config(tmp_path):
    assert main(["triton", str(DEMO), "--out", str(tmp_path), "--tensorrt", "--fp16", "--trt-cache", "/cache"]) == 0
    for cfg_path in tmp_path.glob("*/config.pbtxt"):
        cfg = _parsed(cfg_path)
        (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc.name == "tensorrt"
        assert dict(acc.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
                                        "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"/cache/{cfg.name}"}


def test_two_bundle_versions_sit_side_by_side_and_an_existing_model_needs_force(tmp_path, capsys):
    assert main(["triton", str(DEMO), "--out", str(tmp_path)]) == 0
    assert main(["triton", str(DEMO), "--out", str(tmp_path), "--model-name", "pe-next"]) == 0
    assert sorted(p.parent.name for p in tmp_path.glob("*/config.pbtxt")) == [
        "pe-demo-tiny-0.3.0_stage1", "pe-demo-tiny-0.3.0_stage2", "pe-next_stage1", "pe-next_stage2"]
    capsys.readouterr()
    assert main(["triton", str(DEMO), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already has pe-demo-tiny-0.3.0_stage1" in err and "--force" in err
    assert main(["triton", str(DEMO), "--out", str(tmp_path), "--force", "--max-batch", "4"]) == 0
    assert _parsed(tmp_path / "pe-demo-tiny-0.3.0_stage1" / "config.pbtxt").max_batch_size == 4
    assert not list(tmp_path.glob(".triton-*")), "the temporary build directory is removed"


@pytest.mark.parametrize("argv, says", [
    (["--fp16"], "--fp16 needs --tensorrt"),
    (["--tensorrt", "--kind", "cpu"], "--tensorrt needs --kind gpu"),
    (["--max-batch", "0"], "--max-batch 0; expected 1-1024"),
])
def test_impossible_options_are_refused_in_one_line(tmp_path, capsys, argv, says):
    assert main(["triton", str(DEMO), "--out", str(tmp_path / "repo"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err
    assert not (tmp_path / "repo").exists()


def test_a_bundle_with_a_changed_graph_is_refused_before_anything_is_written(tmp_path, capsys):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(DEMO, bad)
    with open(bad / "stage2.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["triton", str(bad), "--out", str(tmp_path / "repo")]) == 1
    assert "stage2.onnx sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
