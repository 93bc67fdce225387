"""`nora evaluate` (placeholder until its issue lands)."""

from nora_cli.errors import NoraError


def evaluate() -> None:
    raise NoraError("`nora evaluate` is not implemented yet")
