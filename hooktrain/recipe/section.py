"""Base class of every recipe section: typed, strict and documented."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. Unknown keys are errors; every field carries a ``description``
    (used by ``hooktrain recipes-doc`` to generate docs/recipes.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
