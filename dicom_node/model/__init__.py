"""Model stage: every piece of onnxruntime (and Triton client) code of the node.

- `bundle`: the bundle contract (manifest + sha256 of every file) and `load_bundle`.
- `inference`: `Predictor` runs the two ONNX stages and returns a `Prediction`.
- `sequence`: the fixed-length window sequence the stage-2 graph takes.
- `triton`: `TritonPredictor`, the same `Predictor` with both stages on an NVIDIA Triton server
  (`[inference] engine = "triton"`, docs/scaling.md).

`demo/` is the bundled demo model (synthetic phantoms only); `README.md` says how it is rebuilt.
"""
