"""The ``cpsc-ray`` commands, one module per group. Each module's ``add_commands`` adds its parsers; a command
imports the layer it drives only when it runs, so ``cpsc-ray --help`` and ``cpsc-ray report`` load neither
Ray nor torch."""

from __future__ import annotations

import argparse

from cpsc_ray.config import shipped_config_names

DEFAULT_CONFIG = "digits"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"YAML path or shipped config ({', '.join(shipped_config_names())}); default: {DEFAULT_CONFIG}",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. loss.alpha=2")


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
