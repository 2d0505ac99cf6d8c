"""Optional bearer-token authentication for HTTP, WebSocket and gRPC (pure, no Ray).

The token is configured, never hard-coded: `ingress.auth_token_env` names an environment
variable of the ingress replicas, or `ingress.auth_token_file` a file holding it. Unset
both and the API is open. `/health` and the live view's static page `/ui` are always
open. Browsers cannot set headers on WebSocket or EventSource requests, so those two also
accept `?access_token=`.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

# WebSocket close code for a missing or wrong token (4000-4999: application codes).
WS_UNAUTHORIZED = 4401
# /ui is the live view's static page: it holds no data and reads the API with the token.
OPEN_PATHS = frozenset({"/health", "/ui"})


class AuthConfigError(ValueError):
    """The configured token source is missing or empty: refuse to start open."""


def load_token(env_name: str | None, file: Path | None) -> str | None:
    """The expected token, or None when authentication is off. A source that is
    configured but missing or empty is an error: the API must not start open by mistake."""
    if env_name is not None:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise AuthConfigError(f"ingress.auth_token_env: ${env_name} is unset or empty")
        return value
    if file is not None:
        try:
            value = file.read_text().strip()
        except OSError as exc:
            raise AuthConfigError(f"ingress.auth_token_file {file}: {exc.strerror}") from None
        if not value:
            raise AuthConfigError(f"ingress.auth_token_file {file} is empty")
        return value
    return None


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_ok(presented: str | None, expected: str | None) -> bool:
    """True when auth is off, or the presented token equals the expected one (compared
    in constant time)."""
    if expected is None:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())
