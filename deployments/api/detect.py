"""`POST /detect`: one uploaded image through a detector deployment (also gRPC `Detect`).

The ingress forwards the encoded bytes; the detector replica decodes and letterboxes
them beside its engine (a replica's spare CPU, not the one ingress event loop) and
says how, so boxes come back in the image's own pixels.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from deployments.api.errors import (
    BadRequest,
    DeadlineExceeded,
    InternalError,
    InvalidFields,
    PayloadTooLarge,
    Unavailable,
    with_route_exceptions,
)
from graph.common.detection import EncodedImage
from graph.common.errors import (
    BadImageError,
    InferenceError,
    ModelNotReadyError,
    UnknownModelError,
)
from graph.common.schemas import MODEL_ID_PATTERN, DetectConfig, IngressSettings, image_detections
from graph.common.vision import check_header

logger = logging.getLogger("ray.serve")
MULTIPART_SLACK = 64 * 1024  # the form's boundaries and headers around the file

DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG/PNG/...",
                        },
                        "config": {
                            "type": "string",
                            "description": 'JSON, e.g. {"conf": 0.4, "iou": 0.5, '
                            '"classes": [0], "max_det": 100}',
                        },
                    },
                }
            }
        },
    }
}


@dataclass(frozen=True)
class Detectors:
    """The app's detector deployments by model id, and how an image reaches them."""

    handles: dict[str, DeploymentHandle]
    default: str
    settings: IngressSettings

    def resolve(self, model: str | None) -> str:
        """The model to run (the default when none is named); UnknownModelError."""
        model_id = model or self.default
        if model_id not in self.handles:
            raise UnknownModelError(model_id, tuple(self.handles))
        return model_id

    def check_body_model(self, field: str, model: str | None) -> None:
        """A body naming a model not served is a 422 in FastAPI's validation shape."""
        if model is None or model in self.handles:
            return
        raise InvalidFields(
            [
                {
                    "loc": ["body", field],
                    "type": "unknown_model",
                    "msg": f"unknown model {model!r}; known: {sorted(self.handles)}",
                }
            ]
        )

    async def detect_bytes(
        self, data: bytes, config: DetectConfig, model_id: str
    ) -> list[dict[str, Any]]:
        """Detect on an encoded image (the replica decodes it): boxes in the image's own
        pixels. Failures raise ApiErrors carrying the model (and state, queue, error id)
        for every protocol."""
        max_pixels = self.settings.max_image_pixels
        try:
            check_header(data, max_pixels)  # bombs and non-images never reach a replica
        except BadImageError as exc:
            raise BadRequest(str(exc)) from None
        request = EncodedImage(data, max_pixels, config.params())
        timeout_s = self.settings.detect_timeout_s
        response = None
        try:
            response = self.handles[model_id].detect_image.remote(request)
            result = await asyncio.wait_for(response, timeout_s)
        except BadImageError as exc:
            # Ray re-raises it as a subclass whose str() is the remote traceback.
            raise BadRequest(str(getattr(exc, "cause", exc))) from None
        except ModelNotReadyError as exc:
            message = ModelNotReadyError.__str__(exc)
            raise Unavailable(
                message, model=exc.model_id, state=exc.state, error=exc.message
            ) from None
        except BackPressureError as exc:
            raise Unavailable(
                "detector overloaded, retry shortly",
                model=model_id,
                state="overloaded",
                queued=getattr(exc, "num_queued_requests", None),
            ) from None
        except TimeoutError as exc:
            if isinstance(exc, RayTaskError):  # raised in the replica: not our deadline
                raise internal_error(exc, model_id) from None
            if response is not None:
                response.cancel()  # the replica stops working for a client that gave up
            raise DeadlineExceeded(
                f"detection took longer than {timeout_s}s", model=model_id
            ) from None
        except Exception as exc:
            raise internal_error(exc, model_id) from None
        if result.letterbox is None:  # a replica must say how it fitted the image
            raise internal_error(InferenceError("the detector returned no letterbox"), model_id)
        return image_detections(result.rows, result.names, result.letterbox)


def internal_error(exc: BaseException, model_id: str) -> InternalError:
    """A 500 whose error id is in the ingress replica's log with the cause."""
    error_id = uuid.uuid4().hex[:12]
    kind = "inference" if isinstance(exc, InferenceError) else type(exc).__name__
    logger.error(
        "detect failed error_id=%s model=%s kind=%s", error_id, model_id, kind, exc_info=exc
    )
    return InternalError("inference failed", error_id=error_id, model=model_id)


async def read_upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The multipart body's `file` (at most `limit` bytes) and `config` field. A body
    without a length is read here with the limit, never spooled to disk."""
    too_large = PayloadTooLarge(f"upload larger than {limit} bytes", limit_bytes=limit)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise too_large
    if declared is None:  # chunked: the form parser would spool any size to disk
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit + MULTIPART_SLACK:
                raise too_large
        request._body = bytes(body)  # what request.form() then parses
    try:
        async with request.form(max_files=1, max_fields=4) as form:
            upload, raw_config = form.get("file"), form.get("config")
            if not isinstance(upload, UploadFile):
                missing = {
                    "loc": ["body", "file"],
                    "type": "missing",
                    "msg": "a multipart file field is required",
                }
                raise InvalidFields([missing])
            data = await upload.read(limit + 1)
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    except StarletteHTTPException as exc:  # Starlette maps multipart errors itself
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
    if not data:
        raise BadRequest("empty upload")
    if len(data) > limit:
        raise too_large
    return data, raw_config if isinstance(raw_config, str) else None


def router(detectors: Detectors) -> APIRouter:
    """`POST /detect`."""
    api = APIRouter()

    @api.post("/detect", openapi_extra=DETECT_BODY)
    @with_route_exceptions()
    async def detect(
        request: Request, model: str | None = Query(None, pattern=MODEL_ID_PATTERN)
    ) -> Any:
        """Detect objects in one uploaded image; boxes in the image's own pixels."""
        model_id = detectors.resolve(model)
        data, raw_config = await read_upload(request, detectors.settings.max_upload_bytes)
        try:
            config = (
                DetectConfig.model_validate_json(raw_config)
                if raw_config is not None and raw_config.strip()
                else DetectConfig()
            )
        except ValidationError as exc:
            raise InvalidFields.of(exc, "body", "config") from None
        return await detectors.detect_bytes(data, config, model_id)

    return api
