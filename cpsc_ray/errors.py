"""The errors a command ends with, for ``cli.main`` to report in one line with their exit code."""


class InputError(ValueError):
    """Input that cannot be used: a config, override or option, a search space, a storage location, dataset files,
    a teacher's weights, a checkpoint or results. The message names what is wrong and how to fix it; nothing was
    written."""
