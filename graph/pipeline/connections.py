"""An archive's own `redis` / `postgresql` sections, used only where a deployment opts in
(`actions.archive_connections: use`; no Ray).

By default the sections are ignored (an archive a client names must not choose where
data goes). Opted in, each section becomes a *route*: the pipeline's entries for that
sink are named `redis@<digest>` / `postgres@<digest>` and the Actions deployment
delivers them to the archive's server instead of the deployment's. The digest names the
connection without revealing it, so the pipeline that travels to camera actors and the
outbox rows hold no password; the URL itself stays with the Actions deployment (from
the config's archives) or the catalog actor (modelUrl archives).

Section keys, as the seeds' `DatabaseConfig` has them: `host`, `port`, `password`, and
`db` (Redis) or `database`, `user`/`username`, `schema` (PostgreSQL). Unknown keys are
errors: a misspelt password must not silently connect without one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydantic import Field, ValidationError

from graph.common.schemas import StrictModel
from graph.pipeline.spec import SQL_IDENTIFIER


class RedisSection(StrictModel):
    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\-\[\]]+$")
    port: int = Field(6379, ge=1, le=65535)
    password: str | None = Field(None, max_length=512)
    username: str | None = Field(None, max_length=128)
    db: int = Field(0, ge=0, le=1024)


class PostgresSection(StrictModel):
    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\-\[\]]+$")
    port: int = Field(5432, ge=1, le=65535)
    database: str = Field(min_length=1, max_length=63)
    user: str | None = Field(None, max_length=63)
    username: str | None = Field(None, max_length=63)
    password: str | None = Field(None, max_length=512)
    schema_: str = Field("public", alias="schema", pattern=SQL_IDENTIFIER.pattern)


class ConnectionSectionError(ValueError):
    """A connection section that cannot be used (its problems, never its values)."""


@dataclass(frozen=True)
class Route:
    """Where one sink's entries of a pipeline go instead of the deployment's."""

    name: str  # "redis@<digest>" / "postgres@<digest>": what outbox entries carry
    sink: str  # "redis" / "postgres"
    url: str = field(repr=False)  # with its password: never logged, never sent to cameras
    schema: str = "public"  # PostgreSQL only


def _host(host: str) -> str:
    """An IPv6 address in brackets; a name with ':' is not a host."""
    if ":" in host and not host.startswith("["):
        import ipaddress

        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConnectionSectionError(
                f"host: {host!r} is neither a name nor an address"
            ) from None
        return f"[{host}]"
    return host


def _userinfo(user: str | None, password: str | None) -> str:
    if user is None and password is None:
        return ""
    return f"{quote(user or '', safe='')}{':' + quote(password, safe='') if password else ''}@"


def archive_routes(redis: dict[str, Any] | None, postgres: dict[str, Any] | None) -> list[Route]:
    """The routes of an archive's sections; raises ConnectionSectionError naming the
    problems by field (`redis.port: ...`), never by value."""
    routes: list[Route] = []
    try:
        if redis is not None:
            r = RedisSection.model_validate(redis)
            url = f"redis://{_userinfo(r.username, r.password)}{_host(r.host)}:{r.port}/{r.db}"
            public = f"redis://{_userinfo(r.username, None)}{_host(r.host)}:{r.port}/{r.db}"
            routes.append(_route("redis", url, public))
        if postgres is not None:
            p = PostgresSection.model_validate(postgres)
            user = p.user or p.username
            where = f"{_host(p.host)}:{p.port}/{quote(p.database, safe='')}"
            url = f"postgresql://{_userinfo(user, p.password)}{where}"
            public = f"postgresql://{_userinfo(user, None)}{where}"
            routes.append(_route("postgres", url, public, p.schema_))
    except ValidationError as exc:
        problems = [
            f"{'redis' if 'Redis' in exc.title else 'postgresql'}."
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in exc.errors(include_input=False)
        ]
        raise ConnectionSectionError("; ".join(problems)) from None
    return routes


def _route(sink: str, url: str, public: str, schema: str = "public") -> Route:
    """The route's name digests the connection *without* its password (`public`): a
    name shown anywhere cannot be used to test password guesses, and a new password for
    the same server keeps the name (its waiting entries go on with the new one)."""
    digest = hashlib.sha256(f"{sink}\n{public}\n{schema}".encode()).hexdigest()[:16]
    return Route(f"{sink}@{digest}", sink, url, schema)


ROUTE_NAME = re.compile(r"^(redis|postgres)@[0-9a-f]{16}$")


def route_names(routes: list[Route]) -> dict[str, str]:
    """sink → route name: what a pipeline's runtime renames its entries' sinks by."""
    return {r.sink: r.name for r in routes}
