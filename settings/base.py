"""The base every driftrl config model derives from: strict, frozen, documented."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """pydantic model that rejects unknown keys and cannot be mutated after validation.

    ``extra="forbid"`` turns a misspelt YAML key into an error that names it instead of a silently
    ignored setting (a common peer bug: ``choices=[...]`` documented but never enforced).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
