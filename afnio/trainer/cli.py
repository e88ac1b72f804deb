"""The ``afnio`` command: ``afnio report RUN_DIR`` rebuilds a run's HTML report.

Installed as a console script by the package (also ``python -m afnio``).

Example:
    >>> import tempfile
    >>> run_dir = tempfile.mkdtemp()
    >>> main(["report", run_dir])  # doctest: +ELLIPSIS
    wrote .../report.html
    0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from afnio.trainer.report import write_report

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afnio", description="afnio command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="rebuild the HTML report of a Trainer run directory",
        description="Rebuild RUN_DIR/report.html from the run's history.jsonl and graph.svg.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the Trainer's default_root_dir")
    report.add_argument(
        "-o", "--output", metavar="PATH", help="where to write (default RUN_DIR/report.html)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``afnio`` command line.

    Args:
        argv: The arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status: 0 on success, 1 when the run directory can't be reported on (the
        reason is printed to stderr); bad arguments exit with argparse's status 2.
    """
    args = _parser().parse_args(argv)
    try:
        path = write_report(args.run_dir, args.output)
    except (FileNotFoundError, ValueError) as error:
        print(f"afnio: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
