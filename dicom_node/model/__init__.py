"""Model stage: every piece of onnxruntime code of the node.

- `bundle`: the bundle contract (manifest + sha256 of every file) and `load_bundle`.
- `inference`: `Predictor` runs the two ONNX stages and returns a `Prediction`.
- `sequence`: the fixed-length window sequence the stage-2 graph takes.

`demo/` is the bundled demo model (synthetic phantoms only); `README.md` says how it is rebuilt.
"""
