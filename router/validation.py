"""The pydantic base of router/'s configs and artifact schema, and the one way their errors are worded.

Both are moerge's one configuration base (moerge/config_base.py), named here as router/ has always
named them: `Strict` is `ConfigModel`, `format_errors` its error lines, e.g.
`experts.math.holdout.fraction: Input should be less than 1 (got 1.5)`.
May import: moerge.config_base, pydantic.
"""

from __future__ import annotations

from pydantic import ValidationError

from moerge.config_base import ConfigModel as Strict
from moerge.config_base import error_lines

__all__ = ["Strict", "format_errors"]  # Strict is re-exported


def format_errors(error: ValidationError, prefix: str = "") -> str:
    """One line per error: `field.path: message (got value)`; `prefix` is prepended to every path."""
    return "\n".join(line or "(top level)" for _, line in error_lines(error, prefix))
