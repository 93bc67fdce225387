"""DreamBooth checks before anything loads: the instance (and class) images."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    from nora_cli.config.schema import Recipe


def check_data(recipe: Recipe) -> str:
    """The instance images decode, a class folder to fill is writable; returns a line saying what was checked."""
    from nora_cli.data.check import check_images

    if recipe.dreambooth is None:
        raise NoraError("task 'dreambooth' needs a `dreambooth:` section")
    return check_images(recipe.dreambooth)
