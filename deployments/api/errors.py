"""The one table from errors to answers: HTTP status, WebSocket behaviour and gRPC code.

Core code raises its own errors (`graph.common.errors`, the media jobs' and the
subscriptions' errors, Ray's and Serve's); routes raise `ApiError`s for answers they
decide themselves (a bad upload, an unknown id, a detection's context). Every shell asks
this table: HTTP routes through `with_route_exceptions`, the WebSocket session through
`ws_error`, gRPC through `grpc_status`. Anything the table does not name propagates
(Starlette's 500, a closed WebSocket session, gRPC's INTERNAL).

Rows are tried in order and the first `isinstance` match wins: Ray re-raises a remote
error as a class deriving from both `RayTaskError` and the original, so camgraph's own
errors come before Ray's, and a Ray error that is also a camgraph error keeps its
meaning. The message of a core error is read with its own class's `__str__`: `str()` of
Ray's re-raised class is the remote traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec

import grpc
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, GetTimeoutError, RayError
from ray.serve.exceptions import BackPressureError

from deployments.api.auth import WS_UNAUTHORIZED
from deployments.api.ws_protocol import ProtocolError
from deployments.jobs.records import DuplicateJobError, JobFinishedError, JobNotFoundError
from graph.common.errors import (
    InferenceError,
    ModelLoadError,
    ModelNotReadyError,
    StreamLimitReached,
    UnknownModelError,
)
from graph.pipeline.catalog import (
    PipelineLoading,
    PipelinesFull,
    PipelineUnavailable,
    UrlRefused,
)
from stream_actors.subscriptions import SubscriptionRefused

P = ParamSpec("P")
Fields = dict[str, Any]


class ApiError(Exception):
    """An answer a route decides itself: a message and the JSON fields beside it. Its
    class picks the status in `ERRORS`; its fields also travel in gRPC details."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message, self.fields = message, fields


class BadRequest(ApiError):
    """A request that cannot be read (empty or undecodable upload, malformed header)."""


class Unauthenticated(ApiError):
    """A missing or wrong bearer token."""


class NotFound(ApiError):
    """An id (subscription, camera, job) this application does not know."""


class Conflict(ApiError):
    """A request the resource's current state refuses."""


class PayloadTooLarge(ApiError):
    """An upload over the configured limit."""


class Unprocessable(ApiError):
    """A well-formed request whose content is refused (422 with a message)."""


class InvalidFields(ApiError):
    """Field problems in FastAPI's validation shape: `{"detail": [{loc, msg, type}]}`."""

    def __init__(self, details: list[Fields]) -> None:
        super().__init__("; ".join(".".join(map(str, d["loc"])) + f": {d['msg']}" for d in details))
        self.details = details

    @classmethod
    def of(cls, exc: ValidationError, *loc: str) -> InvalidFields:
        """Pydantic's errors, each location prefixed with `loc` (e.g. "body", "config")."""
        return cls(
            [
                {"loc": [*loc, *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
        )


class InternalError(ApiError):
    """A failure that is ours, answered with an id that the replica's log carries."""


class Unavailable(ApiError):
    """A dependency that cannot answer now; the client should retry (Retry-After)."""


class DeadlineExceeded(ApiError):
    """A dependency that did not answer in time."""


def _api(exc: ApiError) -> tuple[str, Fields]:
    return exc.message, exc.fields


Render = Callable[[Any], tuple[str, Fields]]


def _core(kind: type[BaseException], **fields: Callable[[Any], Any]) -> Render:
    def render(exc: Any) -> tuple[str, Fields]:
        return kind.__str__(exc), {name: get(exc) for name, get in fields.items()}

    return render


def _refused(exc: SubscriptionRefused) -> tuple[str, Fields]:
    return exc.reason, {}


def _protocol(exc: ProtocolError) -> tuple[str, Fields]:
    return exc.message, {}


def _validation(exc: ValidationError) -> tuple[str, Fields]:
    return InvalidFields.of(exc).message, {}


def _unavailable(exc: BaseException) -> tuple[str, Fields]:
    # The route names what is unavailable (`with_route_exceptions(unavailable=...)`).
    return type(exc).__name__, {}


@dataclass(frozen=True)
class ErrorRule:
    """How one error type is answered on each protocol."""

    error: type[BaseException]
    http_status: int
    grpc_code: grpc.StatusCode
    render: Render  # message, JSON fields
    # None: an `error` message and the connection stays open; else the close code.
    ws_close: int | None = None
    # A dependency (actor, deployment) away: mapped only where the route says which,
    # and the message is "<what the route says>: <error type>".
    unavailable: bool = False


ERRORS: tuple[ErrorRule, ...] = (
    ErrorRule(BadRequest, 400, grpc.StatusCode.INVALID_ARGUMENT, _api),
    ErrorRule(Unauthenticated, 401, grpc.StatusCode.UNAUTHENTICATED, _api, WS_UNAUTHORIZED),
    ErrorRule(NotFound, 404, grpc.StatusCode.NOT_FOUND, _api),
    ErrorRule(Conflict, 409, grpc.StatusCode.FAILED_PRECONDITION, _api),
    ErrorRule(PayloadTooLarge, 413, grpc.StatusCode.INVALID_ARGUMENT, _api),
    ErrorRule(Unprocessable, 422, grpc.StatusCode.INVALID_ARGUMENT, _api),
    ErrorRule(InvalidFields, 422, grpc.StatusCode.INVALID_ARGUMENT, _api),
    ErrorRule(InternalError, 500, grpc.StatusCode.INTERNAL, _api),
    ErrorRule(Unavailable, 503, grpc.StatusCode.UNAVAILABLE, _api),
    ErrorRule(DeadlineExceeded, 504, grpc.StatusCode.DEADLINE_EXCEEDED, _api),
    ErrorRule(ProtocolError, 400, grpc.StatusCode.INVALID_ARGUMENT, _protocol),
    ErrorRule(
        UnknownModelError,
        404,
        grpc.StatusCode.NOT_FOUND,
        _core(UnknownModelError, model=lambda e: e.model_id, known=lambda e: list(e.known)),
    ),
    ErrorRule(
        ModelNotReadyError,
        503,
        grpc.StatusCode.UNAVAILABLE,
        _core(
            ModelNotReadyError,
            model=lambda e: e.model_id,
            state=lambda e: e.state,
            error=lambda e: e.message,
        ),
    ),
    ErrorRule(ModelLoadError, 503, grpc.StatusCode.UNAVAILABLE, _core(ModelLoadError)),
    ErrorRule(InferenceError, 500, grpc.StatusCode.INTERNAL, _core(InferenceError)),
    ErrorRule(
        DuplicateJobError,
        409,
        grpc.StatusCode.ALREADY_EXISTS,
        _core(DuplicateJobError, job_id=lambda e: e.job_id),
    ),
    ErrorRule(
        JobFinishedError,
        409,
        grpc.StatusCode.FAILED_PRECONDITION,
        _core(JobFinishedError, job_status=lambda e: e.status),
    ),
    ErrorRule(JobNotFoundError, 404, grpc.StatusCode.NOT_FOUND, _core(JobNotFoundError)),
    ErrorRule(SubscriptionRefused, 403, grpc.StatusCode.PERMISSION_DENIED, _refused),
    # A subscription's modelUrl: not on pipelines.allowed_urls, or its archive cannot be
    # served (the message names the problem: a member, a pickle, a schema error, ...).
    ErrorRule(UrlRefused, 403, grpc.StatusCode.PERMISSION_DENIED, _core(UrlRefused)),
    # Still downloading or loading (retry later), or max_loaded pipelines in use.
    ErrorRule(PipelineLoading, 503, grpc.StatusCode.UNAVAILABLE, _core(PipelineLoading)),
    ErrorRule(PipelinesFull, 409, grpc.StatusCode.RESOURCE_EXHAUSTED, _core(PipelinesFull)),
    ErrorRule(
        PipelineUnavailable, 422, grpc.StatusCode.FAILED_PRECONDITION, _core(PipelineUnavailable)
    ),
    # 409, not 429: the registry's current state refuses it, and retrying alone cannot
    # help (429 invites an automatic retry after a while) until a stream ends.
    ErrorRule(
        StreamLimitReached,
        409,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        _core(StreamLimitReached, limit=lambda e: e.limit),
    ),
    ErrorRule(ValidationError, 422, grpc.StatusCode.INVALID_ARGUMENT, _validation),
    # Serve's and Ray's errors after camgraph's (see the module docstring): a dependency
    # is away or overloaded, so the client should retry.
    ErrorRule(BackPressureError, 503, grpc.StatusCode.UNAVAILABLE, _unavailable, unavailable=True),
    ErrorRule(ActorDiedError, 503, grpc.StatusCode.UNAVAILABLE, _unavailable, unavailable=True),
    ErrorRule(GetTimeoutError, 503, grpc.StatusCode.UNAVAILABLE, _unavailable, unavailable=True),
    ErrorRule(RayError, 503, grpc.StatusCode.UNAVAILABLE, _unavailable, unavailable=True),
    ErrorRule(TimeoutError, 503, grpc.StatusCode.UNAVAILABLE, _unavailable, unavailable=True),
)


def rule_for(exc: BaseException, unavailable: str | None = None) -> ErrorRule | None:
    """The first row matching `exc`; "unavailable" rows only where the caller names
    what is unavailable."""
    for rule in ERRORS:
        if isinstance(exc, rule.error) and (unavailable is not None or not rule.unavailable):
            return rule
    return None


def describe(
    rule: ErrorRule, exc: BaseException, unavailable: str | None = None
) -> tuple[str, Fields]:
    """The message and JSON fields of `exc` under its rule."""
    message, fields = rule.render(exc)
    if rule.unavailable:
        message = f"{unavailable}: {message}"
    return message, fields


def error_response(status: int, message: str, **fields: Any) -> JSONResponse:
    """`{"detail": {"message": ..., **fields}}`; a 503 says when to retry."""
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"detail": {"message": message, **fields}}, status, headers=headers)


def http_response(exc: BaseException, unavailable: str | None = None) -> JSONResponse | None:
    """The HTTP answer to `exc`, or None when the table does not name it."""
    rule = rule_for(exc, unavailable)
    if rule is None:
        return None
    if isinstance(exc, InvalidFields):
        return JSONResponse({"detail": exc.details}, rule.http_status)
    if isinstance(exc, ValidationError):
        return JSONResponse({"detail": InvalidFields.of(exc).details}, rule.http_status)
    message, fields = describe(rule, exc, unavailable)
    if isinstance(exc, Unauthenticated):
        return JSONResponse(
            {"detail": {"message": message}},
            rule.http_status,
            headers={"WWW-Authenticate": 'Bearer realm="camgraph"'},
        )
    return error_response(rule.http_status, message, **fields)


def with_route_exceptions(
    unavailable: str | None = None,
) -> Callable[[Callable[P, Awaitable[Any]]], Callable[P, Awaitable[Any]]]:
    """Decorate a route so the errors of the table become their HTTP answers.
    `unavailable` ("media jobs unavailable") names the dependency whose Ray errors and
    timeouts become 503s; without it they propagate (as a 500)."""

    def decorate(route: Callable[P, Awaitable[Any]]) -> Callable[P, Awaitable[Any]]:
        @functools.wraps(route)  # FastAPI reads the route's own signature through this
        async def answer(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return await route(*args, **kwargs)
            except Exception as exc:
                response = http_response(exc, unavailable)
                if response is None:
                    raise
                return response

        return answer

    return decorate


def ws_error(
    exc: BaseException,
    request_type: str | None = None,
    request_id: Any = None,
    unavailable: str | None = None,
) -> ProtocolError | None:
    """The WebSocket `error` message's content for `exc` (the connection stays open),
    or None when the table does not name it or says to close instead (`ws_close`)."""
    rule = rule_for(exc, unavailable)
    if rule is None or rule.ws_close is not None:
        return None
    if isinstance(exc, ProtocolError):
        return exc
    message, _ = describe(rule, exc, unavailable)
    details = exc.details if isinstance(exc, InvalidFields) else None
    return ProtocolError(message, request_type, details, request_id)


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC code and details for `exc`, or None when the table does not name it.
    An ApiError's fields follow its message; a core error's message names its own."""
    rule = rule_for(exc)
    if rule is None:
        return None
    message, _ = describe(rule, exc)
    if isinstance(exc, ApiError):
        extra = ", ".join(f"{k}={v}" for k, v in exc.fields.items() if v is not None)
        message = f"{message} ({extra})" if extra else message
    return rule.grpc_code, message
