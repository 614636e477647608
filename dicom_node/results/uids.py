"""The one UID scheme of every result object: the same inputs always give the same UID.

A result UID is derived from the object kind, the source CT series UID, the model UID, the
revision and (for objects that come in numbers) a part such as the heatmap rank. So a re-run of
the same series with the same bundle replaces rather than duplicates its results, a new model
gives new UIDs, and the SR of revision r - 1 (the predecessor of revision r) can be named without
having been stored.
"""

from __future__ import annotations

import hashlib
from typing import Literal

__all__ = ["ResultKind", "result_uid"]

#: every kind of UID the node derives (one per object and per series of results)
ResultKind = Literal["sr", "sr-series", "sc", "sc-summary", "sc-series", "kos", "kos-series", "tracking", "device"]


def result_uid(kind: ResultKind, source_series_uid: str, model_uid: str, revision: int = 0, *parts: object) -> str:
    """Deterministic UID (2.25 root) for one result object: same inputs -> same UID.

    The UUID-derived 2.25 form holds the first 128 bits of SHA-256 over the parts (pydicom's
    `generate_uid(prefix=None)` ignores `entropy_srcs` and would be random).
    """
    text = "\x1f".join(["dicom-node-pe-results", str(kind), str(source_series_uid), str(model_uid),
                        str(int(revision)), *(str(p) for p in parts)])
    return "2.25." + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big"))
