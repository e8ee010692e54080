"""The ``cpsc-ray`` commands, one module per group. Each module's ``add_commands`` adds its parsers; a command
imports the layer it drives only when it runs, so ``cpsc-ray --help`` and ``cpsc-ray report`` load neither
Ray nor torch."""

from __future__ import annotations

import argparse

from cpsc_ray.config import Config, shipped_config_names

DEFAULT_CONFIG = "digits"
# Where runs go when neither --storage nor the config says otherwise; no shipped config sets output_dir.
DEFAULT_STORAGE = Config.model_fields["output_dir"].default
STORAGE_HELP = "where runs go: a local path, a shared filesystem path or a URI (s3://, gs://)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks; an option's help ends with its default unless the help
    states it already or there is none to state (unset, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if (
            "default" in action.help
            or default is None
            or isinstance(default, bool)
            or default in ([], argparse.SUPPRESS)
        ):
            return action.help
        return f"{action.help} (default: %(default)s)"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"YAML path or shipped config ({', '.join(shipped_config_names())})"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. loss.alpha=2")


def add_run_args(parser: argparse.ArgumentParser, kind: str, default_name: str) -> None:
    """--name, --resume NAME and --storage, alike in every command that starts runs."""
    naming = parser.add_mutually_exclusive_group()
    naming.add_argument(
        "--name", help=f"{kind} name (default: {default_name}); a taken name gets a suffix, never overwriting"
    )
    naming.add_argument(
        "--resume", metavar="NAME", help=f"continue the interrupted {kind} NAME with the config it started with"
    )
    parser.add_argument(
        "--storage",
        metavar="LOCATION",
        help=f"{STORAGE_HELP} (default: the config's output_dir; {DEFAULT_STORAGE} in every shipped config)",
    )


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
