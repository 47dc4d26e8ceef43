"""The base of every config section: each package's config builds on it without importing upward."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config model that rejects unknown keys (a YAML typo is an error naming the key)."""

    model_config = ConfigDict(extra="forbid")
