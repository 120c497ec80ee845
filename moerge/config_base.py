"""The one configuration base of merge/, router/, serving/, `moerge up` and the zoo.

Every config file moerge reads is a `ConfigModel` (extra fields are errors, values frozen unless a
family says why not: `MutableConfigModel`), every failure is one `ConfigError` carrying the field path and the file, and
every pydantic error is worded by one formatter:

    recipe.yaml: invalid merge recipe
      experts[1].path: Input should be a valid path (got 3)

Relative paths follow one rule: relative to the YAML file that names them, or to the current folder
for a config built from data or command-line arguments (no file). Validate with `validate_config` (or
`model_validate(data, context=path_context(base))`) so the path fields below see the folder.
May import: the standard library, pydantic and yaml only — merge/, router/ and serving/ import this
module and nothing else of moerge/ (tests/test_layout.py checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo

BASE_DIR = "base_dir"  # the validation-context key naming the folder relative paths are taken from
SECRET_FIELDS = ("api_key", "sha256", "secret", "password")  # their values are never echoed


class ConfigError(ValueError):
    """A config that cannot be used. The message names each offending field and what was expected;
    `field` is the (first) offending field's path, e.g. `experts[1].path`, and `source` the file it
    came from (None: a config built from data or command-line arguments)."""

    def __init__(self, message: str, *, field: str | None = None, source: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.source = None if source is None else str(source)


class ConfigModel(BaseModel):
    """Extra fields are errors (a typo is never ignored); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MutableConfigModel(ConfigModel):
    """For a config whose validators or callers fill in values after validation (serving's)."""

    model_config = ConfigDict(frozen=False)


# -- paths ------------------------------------------------------------------------------------------


def path_context(base: Path | str | None) -> dict[str, Path]:
    """The validation context that makes relative paths relative to `base` (None: the current folder)."""
    return {BASE_DIR: Path(base).resolve() if base is not None else Path.cwd()}


def base_dir(info: ValidationInfo) -> Path:
    """The folder relative paths are taken from during this validation."""
    context = info.context if isinstance(info.context, dict) else {}
    return Path(context.get(BASE_DIR) or Path.cwd())


def resolve_path(value: Path | str, base: Path) -> Path:
    """The one rule: `~` is the home folder, an absolute path stays, a relative one joins `base`."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def looks_like_path(value: str) -> bool:
    """A model reference that is a local path rather than a model id (`org/name`): `/`, `./`, `../`, `~`."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def _config_path(value: Path, info: ValidationInfo) -> Path:
    return resolve_path(value, base_dir(info))


def _config_path_str(value: str, info: ValidationInfo) -> str:
    return str(resolve_path(value, base_dir(info)))


def _model_ref(value: str, info: ValidationInfo) -> str:
    return str(resolve_path(value, base_dir(info))) if looks_like_path(value) else value


ConfigPath = Annotated[Path, AfterValidator(_config_path)]
"""A path field: relative to the config file (absolute after validation)."""
ConfigPathStr = Annotated[str, AfterValidator(_config_path_str)]
"""The same, kept as a string."""
ModelRef = Annotated[str, AfterValidator(_model_ref)]
"""A local checkpoint folder or a model id: written `./x`, `../x`, `~/x` or `/x` it is a path (relative
to the config file); any other string (`HuggingFaceTB/SmolLM2-135M`) is an id, passed on as is."""


# -- errors -----------------------------------------------------------------------------------------


def field_path(loc: tuple[int | str, ...] | list[int | str], prefix: str = "") -> str:
    """pydantic's error location as moerge writes a field: `experts[1].path`, `experts.math.model`."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _shown_value(item: Any) -> str:
    got = item.get("input")
    if isinstance(got, dict | list | BaseModel) or "input" not in item:
        return ""
    if any(secret in str(part) for part in item["loc"] for secret in SECRET_FIELDS):
        return ""
    text = repr(got)
    return f" (got {text if len(text) <= 100 else text[:97] + '...'})"


def error_lines(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, `path: what was expected (got value)`) per error; `prefix` goes before every path."""
    lines = []
    for item in error.errors():
        where = field_path(item["loc"], prefix)
        message = item["msg"].removeprefix("Value error, ")
        text = f"{message}{_shown_value(item)}"
        lines.append((where, f"{where}: {text}" if where else text))
    return lines


def format_validation_error(
    error: ValidationError, *, what: str, source: str | Path | None = None, prefix: str = ""
) -> str:
    """`SOURCE: invalid WHAT`, then one indented line per error (field path, expectation, value)."""
    head = f"{source}: invalid {what}" if source is not None else f"invalid {what}"
    return "\n".join([head, *(f"  {line}" for _, line in error_lines(error, prefix))])


def config_error(
    error: ValidationError, *, what: str, source: str | Path | None = None, prefix: str = ""
) -> ConfigError:
    """The ConfigError of a failed validation: the formatted message, the first field, the file."""
    lines = error_lines(error, prefix)
    return ConfigError(
        format_validation_error(error, what=what, source=source, prefix=prefix),
        field=lines[0][0] if lines else None,
        source=source,
    )


# -- reading ----------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def read_yaml_mapping(path: Path | str, *, what: str, empty_ok: bool = False) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError (naming the file) if unreadable or not one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"cannot read {what} {path}: file not found", source=path) from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}", source=path) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}", source=path) from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, got {type(data).__name__}", source=path
        )
    return data


def validate_config(
    model: type[M],
    data: object,
    *,
    what: str,
    source: Path | str | None = None,
    base: Path | str | None = None,
) -> M:
    """`model` from `data`, relative paths taken from `base` (default: the folder of `source`, else the
    current folder); a ConfigError naming every bad field (and `source`) otherwise."""
    if not isinstance(data, dict):
        where = f"{source}: " if source is not None else ""
        raise ConfigError(
            f"{where}expected a mapping at the top level, got {type(data).__name__}", source=source
        )
    if base is None and source is not None:
        base = Path(source).resolve().parent
    try:
        return model.model_validate(data, context=path_context(base))
    except ValidationError as error:
        raise config_error(error, what=what, source=source) from None
