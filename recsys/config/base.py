"""What every config section shares: strict validation, and the error a bad config raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be loaded: the message names the file and dotted path."""


class Strict(BaseModel):
    """Base for every config section: unknown keys and silent coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, frozen=False)
