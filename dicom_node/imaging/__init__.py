"""Imaging stage (numpy only; shared with training): DICOM slices -> HU volume -> model input.

- `files`: DICOM files recognised by content (`read_dicom_files`), for `send` and `analyse`.
- `series`: `load_series` builds a `CtSeries` (sorted along the slice normal, HU, spacing checked).
- `preprocess`: `PreprocessConfig` and `preprocess` -> `Windows`, and the model-to-slice geometry.
"""
