"""What every processing stage core has in common.

A core's ``Options`` are its parameters under the names its config section
gives them (``ktel/config.py``), built by ``Options.from_config(section)``;
tests build them directly, also with parameters no config sets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from pydantic import BaseModel


class FromConfig:
    """Mixin of a core's Options dataclass: ``from_config`` takes every field the
    config section has under the same name, and leaves the rest at their defaults."""

    @classmethod
    def from_config(cls, section: BaseModel) -> Self:
        given = type(section).model_fields
        shared: dict[str, Any] = {
            f.name: getattr(section, f.name)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name in given
        }
        return cls(**shared)
