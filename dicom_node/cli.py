"""`dicom-node` command line: `render`, the node's operational commands (`serve`, `echo`, `send`,
`status`, `resend`, `complete`, `config`, from `dicom_node.node_commands`), `demo` and `analyse`
(from `dicom_node.tools.analyse`).

Each subcommand imports what it needs when it runs, so `dicom-node --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="PE-detection DICOM node (research use only, not a medical device).",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the package version and the model bundle (name, version) the node loads; "
                             "`--version --config FILE` for the bundle of that configuration")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_render(subparsers)
    _add_node(subparsers)
    _add_demo(subparsers)
    _add_analyse(subparsers)
    return parser


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from dicom_node.node_commands import version_text

        print(version_text())
        parser.exit(0)


def _add_node(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """serve, echo, send, status, resend, complete, config (dicom_node.node_commands)."""
    from dicom_node.node_commands import add_node_commands

    add_node_commands(subparsers)


def _add_analyse(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """analyse (dicom_node.tools.analyse: the parser lives with the command)."""
    from dicom_node.tools.analyse import add_parser

    add_parser(subparsers)


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole product on two synthetic studies: C-STORE in, SR + heatmaps back into a PACS",
        description="Generate a PE-positive and a PE-negative synthetic CTPA study, start a receiving PACS "
                    "(a real Orthanc when installed, else a built-in storage SCP) and the node with the bundled "
                    "demo model, send both studies by C-STORE, wait for the results, print the findings read back "
                    "from the received SRs and write the heatmap images as PNG files. Exit status 0 when the "
                    "results of both studies came back (whether the calls match the truth is printed). "
                    "The demo model was trained on "
                    "synthetic data only: research use, never on patients.",
    )
    p.add_argument("--out", default="demo-output", metavar="DIR",
                   help="where results (DICOM) and PNG renderings are written (replaced)")
    p.add_argument("--bundle", default="", metavar="DIR", help="model bundle to use: a bundle directory, builtin:ma2022 (the default, Ma et al. 2022 family) or builtin:shi2020 (Shi et al. 2020 family)")
    p.add_argument("--no-orthanc", action="store_true", help="use the built-in storage SCP even if Orthanc is installed")
    p.add_argument("--quiet-period", type=float, default=2.0, metavar="SECONDS",
                   help="series completion quiet period for the demo node")
    p.add_argument("--timeout", type=float, default=240.0, metavar="SECONDS",
                   help="give up waiting for results after this long")
    p.add_argument("--verbose", action="store_true", help="show the node's log events")
    p.add_argument("--worklist", action="store_true",
                   help="then keep the node running with its web worklist on 127.0.0.1 and print the URL and a "
                        "one-time demo login (stop with Ctrl-C)")
    p.add_argument("--worklist-for", type=float, default=0.0, metavar="SECONDS",
                   help="with --worklist: stop after this many seconds instead of waiting for Ctrl-C")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dicom_node.tools.demo import run_demo

    return run_demo(Path(args.out), bundle=args.bundle, prefer_orthanc=not args.no_orthanc,
                    quiet_period_s=args.quiet_period, timeout_s=args.timeout, verbose=args.verbose,
                    worklist=args.worklist, worklist_for_s=args.worklist_for)


def _add_render(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "render",
        help="write PNGs of result images and text renderings of SR/KOS documents",
        description="Render result objects for a quick look without a viewer: Secondary Capture and other "
                    "images become <SOPInstanceUID>.png, SR and KOS documents become <SOPInstanceUID>.txt "
                    "(indented content tree with codes, values and units).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files written by the node (SR, SC, KOS)")
    p.add_argument("--out", default="rendered", metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_render)


def _cmd_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dicom_node.tools.render import render_file

    status = 0
    for f in args.files:
        try:
            print(render_file(Path(f), Path(args.out)))
        except (OSError, ValueError) as exc:
            print(f"render: {f}: {exc}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"] or (len(argv) == 3 and argv[:2] == ["--version", "--config"]):
        from dicom_node.node_commands import version_text

        print(version_text(argv[2] if len(argv) == 3 else None))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
