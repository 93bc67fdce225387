"""`nora factorize` (placeholder until its issue lands)."""

from nora_cli.errors import NoraError


def factorize() -> None:
    raise NoraError("`nora factorize` is not implemented yet")
