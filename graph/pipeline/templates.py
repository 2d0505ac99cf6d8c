"""Field templates of pipeline actions (`{camera_id}`, `{car_brand_cls_v1.brand}`) and
the idempotency keys of actions. Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping
from typing import Any

from graph.common.errors import CamgraphError

# `{session.<field>}`: a field of the display's session data (`patchSession`), which a
# template names like a branch's result; no branch may take this name.
SESSION_NAMESPACE = "session"


class MissingFieldError(CamgraphError):
    """A template names a value the context does not have (yet)."""

    def __init__(self, template: str, name: str) -> None:
        super().__init__(template, name)
        self.template, self.name = template, name

    def __str__(self) -> str:
        return f"template {self.template!r}: no value for {{{self.name}}}"


def template_fields(template: str) -> list[str]:
    """The `{names}` a template refers to (format-string syntax, no conversions)."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"template {template!r}: format specs and conversions are not allowed")
        if not name:
            raise ValueError(f"template {template!r}: empty placeholder {{}}")
        names.append(name)
    return names


def render(
    template: str,
    context: Mapping[str, Any],
    branches: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Fill a template from context values and `<branch>.<field>` branch results.
    Values are inserted as text (containers and booleans as JSON: `{"a": 1}`, `true`);
    a missing value raises MissingFieldError."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        head, _, field = name.partition(".")
        if field:
            result = (branches or {}).get(head)
            if result is None or field not in result or result[field] is None:
                raise MissingFieldError(template, name)
            value = result[field]
        else:
            if name not in context or context[name] is None:
                raise MissingFieldError(template, name)
            value = context[name]
        out.append(as_text(value))
    return "".join(out)


def as_text(value: Any) -> str:
    """A value as a template inserts it: session data may hold any JSON."""
    if isinstance(value, bool | dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def idempotency_key(*parts: object) -> str:
    """A stable key for one action on one object, e.g. (pipeline version, camera, track,
    action index): the same inputs always give the same key, whoever computes it."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode()).hexdigest()[:32]
