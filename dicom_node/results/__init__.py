"""Results stage: every DICOM object the node sends back into the study.

- `uids`: the one deterministic UID scheme of every result kind;
- `codes`: every code the node writes, and reads back;
- `key_slices`: which slices the radiologist should see first (one rule for SR, SCs and KOS);
- `sr`: the TID 1500 Comprehensive 3D SR; `sc`: heatmap and summary Secondary Captures;
  `kos`: the Key Object Selection document;
- `result_set`: `build_results` builds all of them for one analysed series.
"""

from dicom_node.results.result_set import ResultOptions, ResultSet, build_results

__all__ = ["ResultOptions", "ResultSet", "build_results"]
