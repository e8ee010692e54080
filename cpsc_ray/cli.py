"""``cpsc-ray``: train teachers, distil students, tune, report, and show configs and models.

Every command that trains takes ``--config`` (a YAML path or a shipped config name, default ``digits``) and
then dotted overrides, e.g. ``cpsc-ray distill --name try1 loss.alpha=2 train.epochs=5``.
``cpsc-ray config --show`` describes every field; ``cpsc-ray models`` lists what a config can name.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cpsc_ray.commands import distill, report, show, submit, tune
from cpsc_ray.config import ConfigError

COMMAND_GROUPS = (show, distill, tune, report, submit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpsc-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
