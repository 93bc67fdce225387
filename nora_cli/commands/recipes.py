"""`nora recipes ...` (placeholder)."""

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """List shipped recipes."""
