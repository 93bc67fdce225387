"""`nora merge` (placeholder until its issue lands)."""

from nora_cli.errors import NoraError


def merge() -> None:
    raise NoraError("`nora merge` is not implemented yet")
