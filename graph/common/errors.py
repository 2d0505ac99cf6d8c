"""camgraph's error hierarchy. Core code raises these; only the ingress maps them to HTTP.

Each error keeps its fields in `args` so it survives pickling across Ray processes.
"""

from __future__ import annotations


class CamgraphError(Exception):
    """Base of every error camgraph raises on purpose."""


class ModelNotReadyError(CamgraphError):
    """The model exists but cannot serve yet (loading, converting) or failed to load."""

    def __init__(self, model_id: str, state: str, message: str | None = None) -> None:
        super().__init__(model_id, state, message)
        self.model_id, self.state, self.message = model_id, state, message

    def __str__(self) -> str:
        tail = f": {self.message}" if self.message else ""
        return f"model {self.model_id!r} is {self.state}{tail}"


class UnknownModelError(CamgraphError):
    """No model with this id is configured."""

    def __init__(self, model_id: str, known: tuple[str, ...]) -> None:
        super().__init__(model_id, known)
        self.model_id, self.known = model_id, known

    def __str__(self) -> str:
        return f"unknown model {self.model_id!r}; configured: {', '.join(self.known) or 'none'}"


class ModelLoadError(CamgraphError):
    """A model file could not be turned into an engine (missing, corrupt, wrong shape)."""


class BadImageError(CamgraphError, ValueError):
    """An uploaded image that cannot be detected on: not decodable, or too many pixels.
    The client's fault (HTTP 400), raised where the image is decoded."""


class InferenceError(CamgraphError):
    """The engine ran but its output could not be used."""


class DetectorBusy(CamgraphError):
    """The detector refused a frame because its queue is full (Serve's back-pressure):
    the frame is dropped, not an error."""

    def __init__(self, model_id: str, detail: str) -> None:
        super().__init__(model_id, detail)
        self.model_id, self.detail = model_id, detail

    def __str__(self) -> str:
        return f"detector of model {self.model_id!r} is busy: {self.detail}"


class StreamLimitReached(CamgraphError):
    """A subscription that would open a camera stream beyond `streams.max_streams` (the
    seed's `max_streams`): refused until a stream ends. One on a URL already streamed is
    never refused (it opens nothing)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"stream limit reached: at most {self.limit} camera streams (streams.max_streams); "
            "unsubscribe one first (subscriptions to a URL already streamed are accepted)"
        )
