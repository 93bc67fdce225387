"""The strict number types and the strict section base every recipe section uses."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict


def _not_bool(value: Any) -> Any:
    """YAML 1.1 reads yes/no/on/off as booleans; a number field must not take them as 1/0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


#: Integers are integers: no 1e30 -> int, no true -> 1 (`--set train.max_steps=true` is an error).
Int = Annotated[int, Strict()]
#: Floats take ints and numeric strings (YAML 1.1 reads `1e-4` as a string) but not booleans; never inf/nan
#: (`allow_inf_nan=False` on every section).
Float = Annotated[float, BeforeValidator(_not_bool)]
Beta = Annotated[Float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    """Strict base: a typo in a recipe is an error, never a silently ignored key; numbers are finite."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
