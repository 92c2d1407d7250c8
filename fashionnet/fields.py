"""Validated pydantic field types that the configuration models (TrainConfig, SplitConfig) share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field, StrictInt


def _not_bool(value: object) -> object:
    if isinstance(value, bool):  # pydantic would take YAML's true as 1.0
        raise ValueError(f"expected a number, got {value!r}")
    return value


# A finite float; YAML integers (1) and exponents without a dot ('3e-3', a string) are accepted.
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]  # what NumPy and scikit-learn accept
