"""Model stage: every piece of onnxruntime (and Triton client) code of the node.

- `bundle`: the bundle contract (manifest + sha256 of every file) and `load_bundle`.
- `inference`: `Predictor` runs the two ONNX stages and returns a `Prediction`.
- `sequence`: the fixed-length window sequence the stage-2 graph takes.
- `triton`: `TritonPredictor`, the same `Predictor` with both stages on an NVIDIA Triton server
  (`[inference] engine = "triton"`, docs/scaling.md).

`demo/` is the bundled demo model (Ma et al. 2022 family) and `demo_shi/` the second one (Shi et al.
2020 family), both trained on synthetic phantoms only; `README.md` says how they are rebuilt. Wherever
a bundle directory is asked for (`inference.bundle`, `--bundle`), `builtin:ma2022` and
`builtin:shi2020` name them.
"""

from __future__ import annotations

from importlib import resources

#: `builtin:<name>` -> the folder of a bundle shipped inside this package
BUILTIN_BUNDLES = {"ma2022": "demo", "shi2020": "demo_shi"}
BUILTIN_PREFIX = "builtin:"


def builtin_bundle_path(value: str) -> str:
    """`value` with a `builtin:<name>` resolved to the shipped bundle's directory; anything else unchanged.

    Raises ValueError naming the known names for an unknown one."""
    if not value.startswith(BUILTIN_PREFIX):
        return value
    name = value[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_BUNDLES:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_BUNDLES)
        raise ValueError(f"{value!r} is not a shipped bundle; use one of {known} or a bundle directory")
    return str(resources.files("dicom_node.model") / BUILTIN_BUNDLES[name])
