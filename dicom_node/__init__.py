"""PE-detection DICOM node (research use only, not a medical device).

The node never imports torch: model inference runs through onnxruntime.
"""

__all__ = ["__version__", "RESEARCH_USE_STATEMENT"]

__version__ = "0.1.0"

RESEARCH_USE_STATEMENT = (
    "Research use only. Not a medical device. Not for diagnosis: "
    "results must be confirmed by a qualified radiologist."
)
