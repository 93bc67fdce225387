"""One exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class NoraError(Exception):
    """A problem with the user's input (recipe, path, flag). Never a bug in nora."""

    exit_code = 2
