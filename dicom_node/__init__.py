"""PE-detection DICOM node (research use only, not a medical device).

The node never imports torch: model inference runs through onnxruntime.
"""

__all__ = ["RESEARCH_USE_STATEMENT", "__version__", "tool_versions"]

__version__ = "0.1.0"

RESEARCH_USE_STATEMENT = (
    "Research use only. Not a medical device. Not for diagnosis: "
    "results must be confirmed by a qualified radiologist."
)


def tool_versions(prog: str, dependencies: tuple[str, ...]) -> str:
    """`--version` text of a command: "prog 0.1.0 (torch 2.13.0, onnx not installed)".

    Read from the installed distributions' metadata, so nothing heavy is imported to answer.
    """
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return f"{name} not installed"

    return f"{prog} {__version__} ({', '.join(version(d) for d in dependencies)})"
