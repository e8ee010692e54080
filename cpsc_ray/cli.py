"""cpsc-ray: train teachers, distil students, tune, report, and show configs and models.

Every command that trains takes --config (a YAML path or a shipped config name) and then dotted
overrides, e.g. cpsc-ray distill --name try1 loss.alpha=2 train.epochs=5. Runs go to --storage,
or the config's output_dir; --resume NAME continues a run or experiment of that name.
cpsc-ray config --show describes every field; cpsc-ray models lists what a config can name.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from cpsc_ray import __version__
from cpsc_ray.commands import HelpFormatter, config, distill, report, submit, tune
from cpsc_ray.errors import CommandError

COMMAND_GROUPS = (config, distill, tune, report, submit)
EXIT_CODES = """exit codes:
  0  done
  1  the run failed: a distillation diverged, a distributed run ran out of restarts, no trial of a tuning
     experiment finished an epoch, a submitted job failed
  2  usage or input error (options, config, search space, paths, results, model names); nothing was written
  3  submit --wait: the job was still running at --timeout
  4  submit --wait: the cluster stayed unreachable past --reconnect-timeout, or forgot the job; its outcome is unknown
"""


class StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, as logging's last-resort handler does, so one handler set up
    once per process follows a stderr that is swapped later (by tests, or a caller of ``main``)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


class LevelPrefix(logging.Formatter):
    """``warning: message``, the form of argparse's and our own ``error:`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def show_warnings() -> None:
    """cpsc_ray's warnings on stderr; set up once however often ``main`` runs in a process."""
    package = logging.getLogger("cpsc_ray")
    if not any(isinstance(handler, StderrHandler) for handler in package.handlers):
        handler = StderrHandler()
        handler.setFormatter(LevelPrefix())
        package.addHandler(handler)
        package.setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpsc-ray", description=__doc__, epilog=EXIT_CODES, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="cpsc-ray COMMAND --help lists its options",
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter),
    )
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_warnings()
    try:
        return args.func(args)
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
