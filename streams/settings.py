"""The one settings mechanism: typed environment variables on pydantic-settings.

Each owner declares its variables once, in a subclass of :class:`EnvSettings` whose fields
are made by :func:`setting` (the variable's name, default, bounds and description, and who
reads it). ``docs/configuration.md`` shows those declarations: its tables are generated from
them (``python -m services.settings --write``) and a unit test holds the committed page to
what they say.

Rules every setting follows unless its declaration says otherwise: an unset or blank
variable gives the default (``blank="keep"`` takes a set-but-blank value as given); a value
that does not parse, or is out of range, raises :class:`~streams.errors.InvalidSetting`
naming the variable, the value and what is expected, e.g. ``ORCH_BUDGET_MAX_AGENTS must be
a whole number >= 0, got 'abc'``; numbers must be finite (``nan`` and ``inf`` are refused).

Building a settings object with keyword arguments reads no environment: only
:meth:`EnvSettings.from_env` (the whole object) and :meth:`EnvSettings.read` (one field) do.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Literal, Self, Union, get_args, get_origin

import annotated_types
from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streams.errors import InvalidSetting

__all__ = [
    "EnvSettings",
    "comma_list",
    "expected",
    "parsed",
    "render_table",
    "rewrite_doc",
    "setting",
]

_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("_ENVIRON", default=None)


def setting(
    env: str,
    default: Any,
    description: str,
    *,
    read_by: str,
    shown: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    blank: Literal["default", "keep"] = "default",
) -> Any:
    """A field read from the variable ``env``.

    ``shown`` is the default as the documentation shows it, when the value alone would not
    say it (a default computed from another setting, a long constant). ``blank="keep"``
    passes a set-but-blank value through unstripped instead of taking the default.
    """
    return Field(
        default,
        validation_alias=env,
        description=description,
        ge=ge,
        gt=gt,
        le=le,
        json_schema_extra={"read_by": read_by, "shown": shown, "blank": blank},
    )


def parsed(field: str, parse: Callable[[str], Any]) -> Any:
    """A validator for ``field`` that turns a variable's text into its value with ``parse``.

    A value given as a keyword argument passes as it is. ``parse`` raises ``ValueError``
    with the whole message (naming the variable) for text it refuses.
    """

    def _before(value: object) -> object:
        return parse(value) if isinstance(value, str) else value

    return field_validator(field, mode="before")(_before)


def comma_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


class _Environ(PydanticBaseSettingsSource):
    """The variables of the mapping :meth:`EnvSettings.from_env` was given, by field."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ does the work; the base class wants this

    def __call__(self) -> dict[str, Any]:
        environ = _ENVIRON.get()
        if environ is None:
            return {}
        values: dict[str, Any] = {}
        for field in self.settings_cls.model_fields.values():
            env = _env_name(field)
            raw = environ.get(env)
            if raw is None:
                continue
            if _extra(field).get("blank") == "keep":
                values[env] = raw
            elif raw.strip():
                values[env] = raw.strip()
        return values


class EnvSettings(BaseSettings):
    """Settings read from environment variables; subclasses declare fields with :func:`setting`."""

    model_config = SettingsConfigDict(
        frozen=True,
        allow_inf_nan=False,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        arbitrary_types_allowed=True,
        case_sensitive=True,
    )

    title: ClassVar[str] = ""
    """What the table in docs/configuration.md is about (documentation only)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments first, then the mapping from_env was given; no .env files.
        return init_settings, _Environ(settings_cls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Every field from ``environ`` (default: this process's), ``overrides`` first."""
        with _reading(os.environ if environ is None else environ):
            try:
                return cls(**overrides)
            except ValidationError as exc:
                raise InvalidSetting(_message(cls, exc)) from None

    @classmethod
    def read(cls, name: str, environ: Mapping[str, str] | None = None) -> Any:
        """One field, from its variable alone (other variables are neither read nor checked)."""
        source = os.environ if environ is None else environ
        env = _env_name(cls.model_fields[name])
        only = {env: source[env]} if env in source else {}
        return getattr(cls.from_env(only), name)

    @classmethod
    def env_names(cls) -> list[str]:
        return [_env_name(f) for f in cls.model_fields.values()]


@contextmanager
def _reading(environ: Mapping[str, str]) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


def _env_name(field: FieldInfo) -> str:
    alias = field.validation_alias
    if not isinstance(alias, str):
        raise TypeError("an EnvSettings field is declared with setting(env, ...)")
    return alias


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _message(cls: type[EnvSettings], exc: ValidationError) -> str:
    by_name = {name: f for name, f in cls.model_fields.items()}
    by_env = {_env_name(f): f for f in cls.model_fields.values()}
    lines = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        field = by_env.get(key) or by_name.get(key)
        if err["type"] == "value_error":
            # A validator of the class wrote the whole message (it names its variable).
            lines.append(str(err["ctx"]["error"]))
        elif field is None:
            lines.append(f"{cls.__name__}: {err['msg']}")
        else:
            lines.append(f"{_env_name(field)} must be {expected(field)}, got {err['input']!r}")
    return "; ".join(lines)


def expected(field: FieldInfo) -> str:
    """What a field takes, in the words of its error message: ``a whole number >= 0``."""
    kind = _kind(field.annotation)
    ge = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    gt = next((m.gt for m in field.metadata if isinstance(m, annotated_types.Gt)), None)
    le = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    if ge is not None and le is not None:
        return f"{kind} between {ge} and {le}"
    parts = [
        f"{op} {value}" for op, value in ((">=", ge), (">", gt), ("<=", le)) if value is not None
    ]
    return " ".join([kind, " and ".join(parts)]) if parts else kind


def _kind(annotation: Any) -> str:
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is int:
        return "a whole number"
    if annotation is float:
        return "a finite number"
    return "valid"


# ---------------------------------------------------------------------------------------
# Documentation


def _shown_default(field: FieldInfo) -> str:
    shown = _extra(field).get("shown")
    if shown:
        return str(shown)
    value = field.default
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    return f"`{value}`"


def render_table(cls: type[EnvSettings]) -> str:
    """The Markdown table of one settings class: variable, default, read by, what it does."""
    rows = ["| variable | default | read by | what it does |", "|---|---|---|---|"]
    for field in cls.model_fields.values():
        rows.append(
            f"| `{_env_name(field)}` | {_shown_default(field)} | "
            f"{_extra(field).get('read_by', '')} | {field.description or ''} |"
        )
    return "\n".join(rows)


_BLOCK = re.compile(r"(<!-- settings: (\w+) -->\n)(.*?)(<!-- /settings -->)", re.DOTALL)


def rewrite_doc(text: str, classes: Iterable[type[EnvSettings]]) -> str:
    """``text`` with every ``<!-- settings: Name -->`` block holding its class's table.

    Every class must have exactly one block and every block a class.
    """
    by_name = {c.__name__: c for c in classes}
    seen: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in by_name:
            raise KeyError(f"docs block for unknown settings class {name}")
        seen.append(name)
        return f"{match.group(1)}{render_table(by_name[name])}\n{match.group(4)}"

    out = _BLOCK.sub(fill, text)
    missing = sorted(set(by_name) - set(seen))
    doubled = sorted({n for n in seen if seen.count(n) > 1})
    if missing or doubled:
        raise KeyError(f"docs blocks missing for {missing}, repeated for {doubled}")
    return out
