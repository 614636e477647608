"""`dicom-node` command line (draft: subcommands are added by each task)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="PE-detection DICOM node (research use only, not a medical device).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_render(subparsers)
    _add_node(subparsers)
    return parser


def _add_node(subparsers) -> None:
    """serve, echo, send, status, resend, complete, config (dicom_node.node_commands)."""
    from dicom_node.node_commands import add_node_commands

    add_node_commands(subparsers)


def _add_render(subparsers) -> None:
    p = subparsers.add_parser(
        "render",
        help="write PNGs of result images and text renderings of SR/KOS documents",
        description="Render result objects for a quick look without a viewer: Secondary Capture and other "
                    "images become <SOPInstanceUID>.png, SR and KOS documents become <SOPInstanceUID>.txt "
                    "(indented content tree with codes, values and units).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files written by the node (SR, SC, KOS)")
    p.add_argument("--out", default="rendered", metavar="DIR", help="output folder (default: ./rendered)")
    p.set_defaults(func=_cmd_render)


def _cmd_render(args) -> int:
    from pathlib import Path

    from dicom_node.render import render_file

    status = 0
    for f in args.files:
        try:
            print(render_file(Path(f), Path(args.out)))
        except (OSError, ValueError) as exc:
            print(f"render: {f}: {exc}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
