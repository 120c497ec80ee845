"""The pydantic base of router/'s configs and artifact schema, and the one way their errors are worded.

Errors name the field path and what was expected, e.g.
`experts.math.holdout.fraction: Input should be less than 1 (got 1.5)`.
May import: pydantic only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Extra fields are errors (a typo is never ignored); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def format_errors(error: ValidationError, prefix: str = "") -> str:
    """One line per error: `field.path: message (got value)`; `prefix` is prepended to every path."""
    lines = []
    for item in error.errors():
        where = ".".join([p for p in [prefix] if p] + [str(p) for p in item["loc"]]) or "(top level)"
        got = item.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        lines.append(f"{where}: {item['msg']}{shown}")
    return "\n".join(lines)
