"""The one error table (deployments.api.errors): every row's HTTP status and body, its
WebSocket answer and its gRPC code, and the route decorator over a real FastAPI app
(no Ray)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from ray.exceptions import ActorDiedError, GetTimeoutError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.api import errors
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

CODE = grpc.StatusCode
AWAY = "stream registry unavailable"  # what a route names as its dependency


class Config(BaseModel):
    conf: float


def validation_error() -> ValidationError:
    try:
        Config.model_validate({"conf": "high"})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


FIELD_PROBLEM = [{"loc": ["body", "file"], "msg": "a file is required", "type": "missing"}]
CONF_PROBLEM = [
    {
        "loc": ["conf"],
        "msg": "Input should be a valid number, unable to parse string as a number",
        "type": "float_parsing",
    }
]


@dataclass
class Row:
    """Given an error, then: HTTP status and body, WS `error` message (None: the socket
    closes instead), gRPC code and details."""

    error: BaseException
    status: int
    body: Any
    ws: str | None
    code: grpc.StatusCode
    details: str
    unavailable: str | None = None  # what the route names as unavailable


ROWS = [
    Row(
        errors.BadRequest("empty upload"),
        400,
        {"detail": {"message": "empty upload"}},
        "empty upload",
        CODE.INVALID_ARGUMENT,
        "empty upload",
    ),
    Row(
        errors.Unauthenticated("missing or wrong bearer token"),
        401,
        {"detail": {"message": "missing or wrong bearer token"}},
        None,
        CODE.UNAUTHENTICATED,
        "missing or wrong bearer token",
    ),
    Row(
        errors.NotFound("no subscription 'd;c'"),
        404,
        {"detail": {"message": "no subscription 'd;c'"}},
        "no subscription 'd;c'",
        CODE.NOT_FOUND,
        "no subscription 'd;c'",
    ),
    Row(
        errors.Conflict("busy", job_status="running"),
        409,
        {"detail": {"message": "busy", "job_status": "running"}},
        "busy",
        CODE.FAILED_PRECONDITION,
        "busy (job_status=running)",
    ),
    Row(
        errors.PayloadTooLarge("upload larger than 1024 bytes", limit_bytes=1024),
        413,
        {"detail": {"message": "upload larger than 1024 bytes", "limit_bytes": 1024}},
        "upload larger than 1024 bytes",
        CODE.INVALID_ARGUMENT,
        "upload larger than 1024 bytes (limit_bytes=1024)",
    ),
    Row(
        errors.Unprocessable("unknown model 'x'; configured: a", model="x"),
        422,
        {"detail": {"message": "unknown model 'x'; configured: a", "model": "x"}},
        "unknown model 'x'; configured: a",
        CODE.INVALID_ARGUMENT,
        "unknown model 'x'; configured: a (model=x)",
    ),
    Row(
        errors.InvalidFields(FIELD_PROBLEM),
        422,
        {"detail": FIELD_PROBLEM},
        "body.file: a file is required",
        CODE.INVALID_ARGUMENT,
        "body.file: a file is required",
    ),
    Row(
        errors.InternalError("inference failed", error_id="0123456789ab", model="m"),
        500,
        {"detail": {"message": "inference failed", "error_id": "0123456789ab", "model": "m"}},
        "inference failed",
        CODE.INTERNAL,
        "inference failed (error_id=0123456789ab, model=m)",
    ),
    Row(
        errors.Unavailable("detector overloaded, retry shortly", model="m", queued=None),
        503,
        {"detail": {"message": "detector overloaded, retry shortly", "model": "m", "queued": None}},
        "detector overloaded, retry shortly",
        CODE.UNAVAILABLE,
        "detector overloaded, retry shortly (model=m)",
    ),
    Row(
        errors.DeadlineExceeded("detection took longer than 30.0s", model="m"),
        504,
        {"detail": {"message": "detection took longer than 30.0s", "model": "m"}},
        "detection took longer than 30.0s",
        CODE.DEADLINE_EXCEEDED,
        "detection took longer than 30.0s (model=m)",
    ),
    Row(
        ProtocolError("missing 'type'"),
        400,
        {"detail": {"message": "missing 'type'"}},
        "missing 'type'",
        CODE.INVALID_ARGUMENT,
        "missing 'type'",
    ),
    Row(
        UnknownModelError("x", ("a", "b")),
        404,
        {
            "detail": {
                "message": "unknown model 'x'; configured: a, b",
                "model": "x",
                "known": ["a", "b"],
            }
        },
        "unknown model 'x'; configured: a, b",
        CODE.NOT_FOUND,
        "unknown model 'x'; configured: a, b",
    ),
    Row(
        ModelNotReadyError("m", "error", "missing.onnx"),
        503,
        {
            "detail": {
                "message": "model 'm' is error: missing.onnx",
                "model": "m",
                "state": "error",
                "error": "missing.onnx",
            }
        },
        "model 'm' is error: missing.onnx",
        CODE.UNAVAILABLE,
        "model 'm' is error: missing.onnx",
    ),
    Row(
        ModelLoadError("corrupt model"),
        503,
        {"detail": {"message": "corrupt model"}},
        "corrupt model",
        CODE.UNAVAILABLE,
        "corrupt model",
    ),
    Row(
        InferenceError("bad output shape"),
        500,
        {"detail": {"message": "bad output shape"}},
        "bad output shape",
        CODE.INTERNAL,
        "bad output shape",
    ),
    Row(
        DuplicateJobError("scene-1", "f" * 32),
        409,
        {
            "detail": {
                "message": f"media 'scene-1' already has a job in progress: {'f' * 32}",
                "job_id": "f" * 32,
            }
        },
        f"media 'scene-1' already has a job in progress: {'f' * 32}",
        CODE.ALREADY_EXISTS,
        f"media 'scene-1' already has a job in progress: {'f' * 32}",
    ),
    Row(
        JobFinishedError("f" * 32, "done"),
        409,
        {"detail": {"message": f"job {'f' * 32} already finished (done)", "job_status": "done"}},
        f"job {'f' * 32} already finished (done)",
        CODE.FAILED_PRECONDITION,
        f"job {'f' * 32} already finished (done)",
    ),
    Row(
        JobNotFoundError("0" * 32),
        404,
        {"detail": {"message": f"no job '{'0' * 32}'"}},
        f"no job '{'0' * 32}'",
        CODE.NOT_FOUND,
        f"no job '{'0' * 32}'",
    ),
    Row(
        SubscriptionRefused("file cameras read only from data/"),
        403,
        {"detail": {"message": "file cameras read only from data/"}},
        "file cameras read only from data/",
        CODE.PERMISSION_DENIED,
        "file cameras read only from data/",
    ),
    Row(
        UrlRefused("http://evil/x.mpta", "not under any of pipelines.allowed_urls"),
        403,
        {"detail": {"message": "modelUrl refused: not under any of pipelines.allowed_urls"}},
        "modelUrl refused: not under any of pipelines.allowed_urls",
        CODE.PERMISSION_DENIED,
        "modelUrl refused: not under any of pipelines.allowed_urls",
    ),
    Row(
        PipelineLoading("pipeline still downloading after 8s: subscribe again later"),
        503,
        {"detail": {"message": "pipeline still downloading after 8s: subscribe again later"}},
        "pipeline still downloading after 8s: subscribe again later",
        CODE.UNAVAILABLE,
        "pipeline still downloading after 8s: subscribe again later",
    ),
    Row(
        PipelinesFull("8 pipelines are in use"),
        409,
        {"detail": {"message": "8 pipelines are in use"}},
        "8 pipelines are in use",
        CODE.RESOURCE_EXHAUSTED,
        "8 pipelines are in use",
    ),
    Row(
        PipelineUnavailable("http://cms/x.mpta: 'm.pt': a pickle imports os.system"),
        422,
        {"detail": {"message": "http://cms/x.mpta: 'm.pt': a pickle imports os.system"}},
        "http://cms/x.mpta: 'm.pt': a pickle imports os.system",
        CODE.FAILED_PRECONDITION,
        "http://cms/x.mpta: 'm.pt': a pickle imports os.system",
    ),
    Row(
        StreamLimitReached(8),
        409,
        {"detail": {"message": str(StreamLimitReached(8)), "limit": 8}},
        str(StreamLimitReached(8)),
        CODE.RESOURCE_EXHAUSTED,
        str(StreamLimitReached(8)),
    ),
    Row(
        validation_error(),
        422,
        {"detail": CONF_PROBLEM},
        f"conf: {CONF_PROBLEM[0]['msg']}",
        CODE.INVALID_ARGUMENT,
        f"conf: {CONF_PROBLEM[0]['msg']}",
    ),
    Row(
        BackPressureError(num_queued_requests=8, max_queued_requests=8),
        503,
        {"detail": {"message": f"{AWAY}: BackPressureError"}},
        f"{AWAY}: BackPressureError",
        CODE.UNAVAILABLE,
        f"{AWAY}: BackPressureError",
        AWAY,
    ),
    Row(
        ActorDiedError(),
        503,
        {"detail": {"message": f"{AWAY}: ActorDiedError"}},
        f"{AWAY}: ActorDiedError",
        CODE.UNAVAILABLE,
        f"{AWAY}: ActorDiedError",
        AWAY,
    ),
    Row(
        GetTimeoutError("timed out"),
        503,
        {"detail": {"message": f"{AWAY}: GetTimeoutError"}},
        f"{AWAY}: GetTimeoutError",
        CODE.UNAVAILABLE,
        f"{AWAY}: GetTimeoutError",
        AWAY,
    ),
    Row(
        RayError(),
        503,
        {"detail": {"message": f"{AWAY}: RayError"}},
        f"{AWAY}: RayError",
        CODE.UNAVAILABLE,
        f"{AWAY}: RayError",
        AWAY,
    ),
    Row(
        TimeoutError(),
        503,
        {"detail": {"message": f"{AWAY}: TimeoutError"}},
        f"{AWAY}: TimeoutError",
        CODE.UNAVAILABLE,
        f"{AWAY}: TimeoutError",
        AWAY,
    ),
]


def row_id(row: Row) -> str:
    return type(row.error).__name__


def test_every_rule_of_the_table_is_tested_here() -> None:
    tested = {errors.rule_for(row.error, row.unavailable) for row in ROWS}
    assert tested == set(errors.ERRORS)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_http_status_and_body(row: Row) -> None:
    response = errors.http_response(row.error, row.unavailable)
    assert response is not None
    assert response.status_code == row.status
    assert json.loads(response.body) == row.body
    assert (response.headers.get("retry-after") == "1") == (row.status == 503)
    if row.status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="camgraph"'


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_websocket_error_message_or_close(row: Row) -> None:
    error = errors.ws_error(row.error, "subscribe", 7, row.unavailable)
    if row.ws is None:
        assert error is None
        rule = errors.rule_for(row.error)
        assert rule is not None and rule.ws_close == WS_UNAUTHORIZED
        return
    assert error is not None and error.message == row.ws
    if isinstance(row.error, ProtocolError):
        assert error is row.error  # its own request type and id
    else:
        assert (error.request_type, error.request_id) == ("subscribe", 7)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_grpc_code_and_details(row: Row) -> None:
    if row.unavailable is not None:
        # gRPC names no dependency: a Ray error there is not the table's to answer.
        assert errors.grpc_status(row.error) is None
        return
    assert errors.grpc_status(row.error) == (row.code, row.details)


@pytest.mark.parametrize(
    "error", [RayError(), ActorDiedError(), TimeoutError(), BackPressureError(1, 1), KeyError("x")]
)
def test_without_a_named_dependency_ray_errors_and_others_propagate(error: Exception) -> None:
    assert errors.http_response(error) is None
    assert errors.ws_error(error) is None


def test_a_camgraph_error_re_raised_by_ray_keeps_its_row_and_message() -> None:
    cause = DuplicateJobError("scene-1", "a" * 32)
    remote = RayTaskError("submit", "Traceback (most recent call last): ...", cause)
    wrapped = remote.as_instanceof_cause()
    assert isinstance(wrapped, RayError) and isinstance(wrapped, DuplicateJobError)
    response = errors.http_response(wrapped, "media jobs unavailable")
    assert response is not None and response.status_code == 409
    assert json.loads(response.body)["detail"] == {
        "message": f"media 'scene-1' already has a job in progress: {'a' * 32}",
        "job_id": "a" * 32,
    }


def test_with_route_exceptions_answers_from_the_table_and_keeps_the_signature() -> None:
    app = FastAPI()

    @app.get("/things/{name}")
    @errors.with_route_exceptions("things unavailable")
    async def thing(name: str, limit: int = Query(5, ge=1)) -> Any:
        if name == "missing":
            raise errors.NotFound(f"no thing {name!r}")
        if name == "away":
            raise ActorDiedError()
        if name == "bug":
            raise ZeroDivisionError
        return {"name": name, "limit": limit}

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/things/a?limit=3").json() == {"name": "a", "limit": 3}
    assert client.get("/things/a?limit=0").status_code == 422  # FastAPI still validates
    missing = client.get("/things/missing")
    assert missing.status_code == 404
    assert missing.json() == {"detail": {"message": "no thing 'missing'"}}
    away = client.get("/things/away")
    assert away.status_code == 503 and away.headers["retry-after"] == "1"
    assert away.json() == {"detail": {"message": "things unavailable: ActorDiedError"}}
    assert client.get("/things/bug").status_code == 500  # not the table's: propagates
