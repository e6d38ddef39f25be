"""``report``: its options live in ``cacovid_rl.eval.report``, which imports torch.

The main parser only holds a placeholder that takes the rest of the line; the report's own parser is built
when the report runs or shows its help, so ``cacovid-rl --help`` stays light.
"""

from __future__ import annotations

import argparse

from cacovid_cli.common import PROG, HelpFormatter, common_flags, examples, resolve_config


def register_placeholder(sub: argparse._SubParsersAction) -> None:
    """Add ``report`` to the main parser as a name that takes everything after it."""
    p = sub.add_parser(
        "report", add_help=False, help="evaluation report (JSON + Markdown + PNG) over trained runs; see report --help"
    )
    p.add_argument("report_args", nargs=argparse.REMAINDER)


def report_parser() -> argparse.ArgumentParser:
    """The report's own parser, presented as ``cacovid-rl report`` (usage, defaults, examples, --debug)."""
    from cacovid_rl.eval.report import build_parser as build_report_parser

    p = build_report_parser()
    p.prog = f"{PROG} report"
    p.formatter_class = HelpFormatter
    p.epilog = examples(
        "cacovid-rl report --run runs/debug_local",
        "cacovid-rl report --run runs/report --out docs/report            # every seed under runs/report",
        "cacovid-rl report --run runs/qwen7b --data /mnt/data/videomme/test.parquet --layout videomme --device cuda",
    )
    for action in common_flags()._actions:
        p._add_action(action)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    from cacovid_rl.eval.report import main as report_main

    if args.config:  # the report's fallback config takes presets too
        args.config = str(resolve_config(args.config))
    return report_main(args)
