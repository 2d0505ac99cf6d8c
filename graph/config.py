"""The application's `args` (from serve_config.yaml), validated once at build time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from deployments.jobs.settings import MediaJobSettings
from graph.common.schemas import (
    ActionsSettings,
    EventHubSettings,
    IngressSettings,
    ModelSpec,
    StrictModel,
)
from graph.pipeline.archive import ArchiveLimits
from graph.pipeline.catalog import UrlPipelineSettings, UrlPipelinesSpec
from stream_actors.settings import StreamSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class PipelineRef(StrictModel):
    """One pipeline archive to serve; its root model becomes a detector, each branch a
    Classifier deployment, and its actions go through the Actions deployment."""

    archive: str = Field(
        min_length=1, max_length=2048, description=".mpta path (relative: base_dir) or URL"
    )
    intra_op_threads: int | Literal["auto"] = Field(1, description="detector ORT threads")
    branch_threads: int = Field(1, ge=1, le=64, description="classifier ORT threads")
    trt_cache_dir: Path | None = Field(None, description="TensorRT cache of the detector")


class AppConfig(StrictModel):
    """`pipelines` is a list of archives, or a mapping: `archives` (that list) and the
    settings of pipelines loaded from a subscription's modelUrl (`allowed_urls`, ...)."""

    models: list[ModelSpec] = Field(default_factory=list, description="plain detector models")
    pipelines: list[PipelineRef] = Field(default_factory=list, description=".mpta pipelines")
    url_pipelines: UrlPipelineSettings = Field(
        UrlPipelineSettings(), description="modelUrl pipelines (from pipelines: {...})"
    )
    archive_cache_dir: Path = Field(Path("data/archives"), description="extracted archives")
    onnx_cache_dir: Path = Field(
        Path("data/onnx-cache"), description=".pt models exported to ONNX, keyed by sha256"
    )
    archive_limits: ArchiveLimits = ArchiveLimits()
    ingress: IngressSettings = IngressSettings()
    streams: StreamSettings = StreamSettings()
    actions: ActionsSettings = ActionsSettings()
    events: EventHubSettings = EventHubSettings()
    jobs: MediaJobSettings = MediaJobSettings()
    base_dir: Path = Field(PROJECT_ROOT, description="where relative model paths resolve")

    @model_validator(mode="before")
    @classmethod
    def _pipelines_mapping(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("pipelines"), dict):
            if "url_pipelines" in data:
                raise ValueError("give modelUrl settings in pipelines: {...} only")
            mapping = dict(data["pipelines"])
            archives = mapping.pop("archives", [])
            return {**data, "pipelines": archives, "url_pipelines": mapping}
        return data

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        if not self.models and not self.pipelines:
            raise ValueError("configure at least one of models, pipelines")
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        return self

    def absolute(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def resolved_models(self) -> list[ModelSpec]:
        """Model specs with absolute paths (replicas do not share the caller's cwd)."""
        out = []
        for m in self.models:
            updates: dict[str, Path] = {}
            if not m.path.is_absolute():
                updates["path"] = (self.base_dir / m.path).resolve()
            if m.trt_cache_dir is not None and not m.trt_cache_dir.is_absolute():
                updates["trt_cache_dir"] = (self.base_dir / m.trt_cache_dir).resolve()
            updates["onnx_cache_dir"] = self.absolute(m.onnx_cache_dir or self.onnx_cache_dir)
            out.append(m.model_copy(update=updates))
        return out

    def url_pipeline_spec(self) -> UrlPipelinesSpec | None:
        """What the catalog and the multiplexed deployments run with; None: modelUrl off."""
        if not self.url_pipelines.enabled:
            return None
        return UrlPipelinesSpec(
            settings=self.url_pipelines,
            archive_cache_dir=self.absolute(self.archive_cache_dir),
            onnx_cache_dir=self.absolute(self.onnx_cache_dir),
            trt_cache_dir=next(
                (self.absolute(p.trt_cache_dir) for p in self.pipelines if p.trt_cache_dir), None
            ),
            limits=self.archive_limits,
            use_connections=self.actions.archive_connections == "use",
        )

    def resolved_ingress(self) -> IngressSettings:
        """Ingress settings with the token file's path made absolute."""
        path = self.ingress.auth_token_file
        if path is None or path.is_absolute():
            return self.ingress
        return self.ingress.model_copy(update={"auth_token_file": self.absolute(path)})

    def resolved_streams(self) -> StreamSettings:
        """Stream settings with the state file's and the file cameras' paths absolute."""
        return self.streams.model_copy(
            update={
                "state_path": self.absolute(self.streams.state_path),
                "file_dirs": tuple(map(self.absolute, self.streams.file_dirs)),
            }
        )
