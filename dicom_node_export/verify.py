"""`dicom-node-export verify DIR`: the node's own bundle checks plus a run of both graphs.

All checks live in `dicom_node.model.bundle.verify_bundle` (one implementation for the node and for
this command): sha256 of every listed file, manifest schema, opset, known preprocessing version,
then both graphs (and their float16 variants) on random input of the declared shapes.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.model.bundle import BundleError, VerifyReport, verify_bundle

__all__ = ["verify", "BundleError"]


def verify(path: str | Path, *, run_graphs: bool = True, batch: int = 2) -> VerifyReport:
    """Verify the bundle at `path`; raise `BundleError` naming the file or key that fails."""
    return verify_bundle(path, run_graphs=run_graphs, batch=batch)
