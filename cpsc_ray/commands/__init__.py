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
    """--name, --resume NAME, --resume-or-start NAME and --storage, alike in every command that starts runs."""
    naming = parser.add_mutually_exclusive_group()
    naming.add_argument(
        "--name", help=f"{kind} name (default: {default_name}); a taken name gets a suffix, never overwriting"
    )
    naming.add_argument(
        "--resume", metavar="NAME", help=f"continue the interrupted {kind} NAME with the config it started with"
    )
    naming.add_argument(
        "--resume-or-start",
        metavar="NAME",
        help=f"continue the {kind} NAME if it exists (as --resume does), else start it under exactly that name: "
        "what a job that may run again should pass (a retried RayJob, a resubmission after the head restarted, "
        "a rerun of launch/paper_grid.sh)",
    )
    parser.add_argument(
        "--storage",
        metavar="LOCATION",
        help=f"{STORAGE_HELP} (default: the config's output_dir; {DEFAULT_STORAGE} in every shipped config)",
    )


def add_recovery_args(group: argparse._ArgumentGroup, restarts_help: str) -> None:
    """How Ray Train runs recover and how long they wait: alike for distill --workers and multi-worker trials."""
    from cpsc_ray.cluster.recovery import Recovery

    group.add_argument("--max-restarts", type=int, default=0, help=restarts_help)
    group.add_argument(
        "--start-timeout",
        type=float,
        default=Recovery().start_timeout_s,
        metavar="SECONDS",
        help="how long each start of a worker group waits for its resources (other jobs, nodes an autoscaler adds) "
        "before it counts as a failed restart",
    )
    group.add_argument(
        "--collective-timeout",
        type=float,
        default=Recovery().collective_timeout_s,
        metavar="SECONDS",
        help="how long a DDP collective waits for a rank that stopped answering before its peers fail and the "
        "worker group restarts from its checkpoint",
    )
    group.add_argument(
        "--autoscaling",
        action="store_true",
        help="the cluster adds nodes on demand but its autoscaler reports no node types to Ray: let requests larger "
        "than the cluster is now wait (up to --start-timeout) instead of refusing them",
    )


def recovery(args: argparse.Namespace):
    from cpsc_ray.cluster.recovery import Recovery

    return Recovery(args.max_restarts, args.start_timeout, args.collective_timeout)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
