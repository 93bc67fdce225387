"""`nora sample` (placeholder until its issue lands)."""

from nora_cli.errors import NoraError


def sample() -> None:
    raise NoraError("`nora sample` is not implemented yet")
