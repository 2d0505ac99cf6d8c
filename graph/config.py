"""The application's `args` (from serve_config.yaml), validated once at build time."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from deployments.schemas import IngressSettings, ModelSpec, StrictModel
from stream_actors.actors import StreamSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class AppConfig(StrictModel):
    models: list[ModelSpec] = Field(min_length=1, description="detector models to serve")
    ingress: IngressSettings = IngressSettings()
    streams: StreamSettings = StreamSettings()
    base_dir: Path = Field(PROJECT_ROOT, description="where relative model paths resolve")

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        default = self.ingress.default_model
        if default is not None and default not in ids:
            raise ValueError(f"ingress.default_model {default!r} is not one of {ids}")
        return self

    def resolved_models(self) -> list[ModelSpec]:
        """Model specs with absolute paths (replicas do not share the caller's cwd)."""
        out = []
        for m in self.models:
            updates: dict[str, Path] = {}
            if not m.path.is_absolute():
                updates["path"] = (self.base_dir / m.path).resolve()
            if m.trt_cache_dir is not None and not m.trt_cache_dir.is_absolute():
                updates["trt_cache_dir"] = (self.base_dir / m.trt_cache_dir).resolve()
            out.append(m.model_copy(update=updates))
        return out

    def resolved_streams(self) -> StreamSettings:
        """Stream settings with the state file's path made absolute."""
        path = self.streams.state_path
        if path.is_absolute():
            return self.streams
        return self.streams.model_copy(update={"state_path": (self.base_dir / path).resolve()})


def detector_name(model_id: str) -> str:
    """Deployment name of a model's detector, as used in serve_config.yaml overrides."""
    return f"Detector_{model_id}"
