"""What `build_graph` hands the Ingress: typed settings, no Ray (so no handles here).

`graph.app.build_graph` is the composition root: it validates the app's args once and
builds one `IngressConfig`; the Ingress binds it with the deployment handles beside it
(handles are Serve's to resolve, so they stay separate bind arguments).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deployments.jobs.settings import MediaJobSettings
from graph.common.names import ACTIONS
from graph.common.schemas import EventHubSettings, IngressSettings
from graph.pipeline.catalog import UrlPipelinesSpec
from graph.pipeline.spec import PipelineFile
from stream_actors.settings import StreamSettings


@dataclass(frozen=True)
class PipelineWiring:
    """One served pipeline: its validated file and the deployments its flow calls."""

    pipeline: PipelineFile
    version: str
    classifiers: dict[str, str]  # branch model id → Classifier deployment name
    actions: str = ACTIONS  # the Actions deployment name
    sink_routes: dict[str, str] = field(default_factory=dict)  # archive_connections: use


@dataclass(frozen=True)
class IngressConfig:
    """Everything an Ingress replica and the control plane it connects to run with."""

    detectors: dict[str, str]  # model id → Detector deployment name, in config order
    model_sizes: dict[str, int]  # model id → detector input size
    settings: IngressSettings = field(default_factory=IngressSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    events: EventHubSettings = field(default_factory=EventHubSettings)
    jobs: MediaJobSettings = field(default_factory=MediaJobSettings)
    pipelines: dict[str, PipelineWiring] = field(default_factory=dict)  # by root model id
    url_pipelines: UrlPipelinesSpec | None = None  # None: a modelUrl is never fetched

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError("an ingress needs at least one detector")
        if set(self.model_sizes) != set(self.detectors):
            raise ValueError("model_sizes must name exactly the detectors' models")

    @property
    def default_model(self) -> str:
        """The model of a request that names none: configured, else the first one."""
        return self.settings.default_model or next(iter(self.detectors))
