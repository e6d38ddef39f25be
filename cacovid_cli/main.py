"""The ``cacovid-rl`` command: train, evaluate and serve CaCoVID video-token compression policies.

Conventions every subcommand follows: ``--config`` takes a shipped preset name (``debug_local``,
``llava_ov_7b``, ...) or a YAML path, followed by dotted overrides; ``--device`` wherever a model runs;
``--data`` is always a records JSON file (a directory is ``--data-dir`` or ``--out``); a user error (missing
file, bad config, unusable policy or video) prints one ``error:`` line and exits 2, with the traceback only
under ``--debug``.

This module holds the parser and the dispatch; each group of subcommands lives in its own module and imports
what it runs (torch, transformers, Ray) inside the command, so ``--help`` is fast and imports neither.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from cacovid_cli import answer, convert, data, report, training
from cacovid_cli.common import PROG, Command, HelpFormatter, UserError, common_flags, examples


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cacovid-rl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=HelpFormatter,
        epilog=examples(
            "cacovid-rl train                      # local debug training (preset debug_local)",
            "cacovid-rl train --help               # every subcommand has examples",
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_flags()

    def add(name: str, help_text: str, func: Command, *example_lines: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            parents=[common],
            formatter_class=HelpFormatter,
            epilog=examples(*example_lines),
            **kw,
        )
        p.set_defaults(func=func)
        return p

    # The order here is the order of `cacovid-rl --help`.
    training.register(add)
    answer.register(add)
    data.register(add)
    convert.register(add)
    report.register_placeholder(sub)
    return parser


def is_user_error(exc: BaseException) -> bool:
    """Errors that mean "what you asked for cannot be done as asked", as opposed to a bug in this code.

    Value and file errors are how the library reports bad input (configs, records, policies, videos, model
    directories); the model-loading and video errors are ``RuntimeError``s, matched by type only where their
    module was imported (so this check imports nothing).
    """
    if isinstance(exc, (UserError, ValueError, OSError)):
        return True
    for module, name in (
        ("cacovid_rl.data.video", "VideoDecodeError"),
        ("cacovid_rl.models.loading", "ModelLoadError"),
        ("cacovid_rl.models.preprocessing", "VideoProcessorError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; ``report`` hands everything after its name to the report's own parser."""
    n_global = 0
    while n_global < len(argv) and argv[n_global].startswith("-"):
        n_global += 1
    if argv[n_global : n_global + 1] == ["report"]:
        top = build_parser().parse_args([*argv[:n_global], "report"])  # global flags, --version, --help
        args = report.report_parser().parse_args(argv[n_global + 1 :], namespace=top)
        args.func = report.cmd_report
        return args
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
        hint = "" if isinstance(exc, UserError) else " (--debug shows the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
