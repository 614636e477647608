"""Triton Python-backend model that runs one ONNX graph with onnxruntime (CPU): `model.py` of the loopback server.

The official Triton container serves the repository of `dicom-node-export triton` with its ONNX Runtime
backend. The `nvidia-pytriton` wheel that the tests and `benchmarks/triton.py` can install ships the same
`tritonserver` binary but only the Python backend, so `dicom_node.tools.triton_server` copies the
repository, switches each config to `backend: "python"` and puts this file beside each `model.onnx` as
`model.py`: the server (batching, protocol, model control) is the real one, the graph runs in onnxruntime.

Runs inside the backend's stub process (the `.venv-triton` interpreter), not in the node: only numpy,
onnxruntime and the stub's `triton_python_backend_utils` (imported in the functions, so the node's own
import checks can import this module). A request batch from Triton's dynamic batcher is concatenated
into one onnxruntime run and split again. `TRITON_TEST_DELAY_S` (environment) sleeps before each run:
the tests use it to have a request in flight when they stop the server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TritonPythonModel"]


class TritonPythonModel:
    """The Python backend's model interface: `initialize`, `execute`, `finalize`."""

    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("TRITON_TEST_ORT_THREADS", "0") or 0)
        self.session = ort.InferenceSession(str(graph), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.delay_s = float(os.environ.get("TRITON_TEST_DELAY_S", "0") or 0)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        if self.delay_s:
            time.sleep(self.delay_s)
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        sizes = [f[self.inputs[0]].shape[0] for f in feeds]
        batch = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
        outs = self.session.run(self.outputs, batch)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o[start:start + size])) for n, o in zip(self.outputs, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
