"""`nora train` (placeholder until its issue lands)."""

from nora_cli.errors import NoraError


def train() -> None:
    raise NoraError("`nora train` is not implemented yet")
