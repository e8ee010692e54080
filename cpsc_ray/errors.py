"""The errors a command ends with. ``cli.main`` reports each in one ``error:`` line and exits with its class's code;
no command maps exceptions to exit codes itself."""


class CommandError(Exception):
    exit_code = 1


class InputError(CommandError, ValueError):
    """Input that cannot be used: a config, override or option, a search space, a storage location, dataset files,
    a teacher's weights, a checkpoint or results. The message names what is wrong and how to fix it; nothing was
    written."""

    exit_code = 2


class RunFailed(CommandError, RuntimeError):
    """A run that started and failed: a distillation diverged, a distributed run ran out of restarts, no trial of a
    tuning experiment finished an epoch, a submitted job failed. The message says what is kept and what to do."""

    exit_code = 1
