"""Builds the camgraph Serve application from `serve_config.yaml` arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from ray.serve import Application
from ray.serve.deployment import Deployment

from graph.common.names import (
    ACTIONS,
    INGRESS,
    PIPELINE_CLASSIFIER,
    PIPELINE_DETECTOR,
    classifier_name,
    detector_name,
)
from graph.common.schemas import BranchModelSpec, ModelSpec
from graph.config import AppConfig, PipelineRef
from graph.pipeline.archive import LoadedArchive, load_archive
from graph.pipeline.connections import (
    ConnectionSectionError,
    Route,
    archive_routes,
    route_names,
)
from graph.wiring import IngressConfig, PipelineWiring


@dataclass(frozen=True)
class Deployments:
    """The deployment classes, passed in so tests can build the graph without a cluster."""

    detector: Deployment
    ingress: Deployment
    classifier: Deployment | None = None
    actions: Deployment | None = None
    # The multiplexed deployments of modelUrl pipelines (pipelines.allowed_urls).
    url_detector: Deployment | None = None
    url_classifier: Deployment | None = None


def pipeline_models(
    ref: PipelineRef, loaded: LoadedArchive, use_connections: bool = False
) -> tuple[ModelSpec, list[BranchModelSpec]]:
    """The detector spec of a pipeline's root and the spec of every branch model."""
    root = loaded.pipeline.pipeline
    assert root.modelFile is not None  # the schema requires it except for OCR branches
    detector = ModelSpec(
        id=root.modelId,
        path=loaded.model_path(root.modelFile),
        warnings=[] if use_connections else loaded.pipeline.connection_warnings(),
        imgsz=root.imgsz or 640,
        intra_op_threads=ref.intra_op_threads,
        trt_cache_dir=ref.trt_cache_dir,
    )
    branches = [
        BranchModelSpec(
            id=node.modelId,
            kind="ocr" if node.modelType == "ocr" else "classifier",
            path=loaded.model_path(node.modelFile) if node.modelFile else None,
            intra_op_threads=ref.branch_threads,
        )
        for node in root.walk()[1:]
    ]
    return detector, branches


def build_graph(config: AppConfig, deployments: Deployments) -> Application:
    """Bind a detector per model and per pipeline root, a Classifier per branch model,
    the Actions deployment when any pipeline is served, and the ingress over them all.
    Archives are loaded (checked, extracted to the cache) here, before anything binds."""
    models = config.resolved_models()
    branch_specs: list[BranchModelSpec] = []
    pipelines: dict[str, PipelineWiring] = {}
    use_connections = config.actions.archive_connections == "use"
    routes: dict[str, Route] = {}  # the archives' own connections, by route name
    for ref in config.pipelines:
        source = ref.archive
        if "://" not in source:
            source = str(config.absolute(Path(source)))
        loaded = load_archive(
            source, config.absolute(config.archive_cache_dir), config.archive_limits
        )
        detector, branches = pipeline_models(ref, loaded, use_connections)
        own: list[Route] = []
        if use_connections:
            try:
                own = archive_routes(loaded.pipeline.redis, loaded.pipeline.postgresql)
            except ConnectionSectionError as exc:
                raise ValueError(f"{ref.archive}: connection sections: {exc}") from None
            routes.update((r.name, r) for r in own)
        if ref.trt_cache_dir is not None:
            detector = detector.model_copy(
                update={"trt_cache_dir": config.absolute(ref.trt_cache_dir)}
            )
        exports = {"onnx_cache_dir": config.absolute(config.onnx_cache_dir)}
        detector = detector.model_copy(update=exports)
        branches = [b.model_copy(update=exports) for b in branches]
        models.append(detector)
        branch_specs += branches
        pipelines[detector.id] = PipelineWiring(
            pipeline=loaded.pipeline.without_connections(),  # no archive password travels
            version=loaded.pipeline.version or loaded.sha256[:12],
            classifiers={b.id: classifier_name(b.id) for b in branches},
            actions=ACTIONS,
            sink_routes=route_names(own),
        )
    ids = [m.id for m in models] + [b.id for b in branch_specs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"model ids must be unique across models and pipelines: {repeated}")
    default = config.ingress.default_model
    if default is not None and default not in {m.id for m in models}:
        raise ValueError(
            f"ingress.default_model {default!r} is not one of {[m.id for m in models]}"
        )

    detectors = {
        m.id: deployments.detector.options(name=detector_name(m.id)).bind(m.model_dump(mode="json"))
        for m in models
    }
    classifiers: dict[str, Any] = {}
    url_models: list[Any] = []
    actions: Any = None
    url_spec = config.url_pipeline_spec()
    if pipelines or url_spec is not None:
        if deployments.classifier is None or deployments.actions is None:
            raise ValueError("pipelines need the Classifier and Actions deployments")
        classifiers = {
            b.id: deployments.classifier.options(name=classifier_name(b.id)).bind(
                b.model_dump(mode="json")
            )
            for b in branch_specs
        }
        if url_spec is not None:
            if deployments.url_detector is None or deployments.url_classifier is None:
                raise ValueError("pipelines.allowed_urls needs the Pipeline* deployments")
            dumped = url_spec.model_dump(mode="json")
            url_models = [
                deployments.url_detector.options(name=PIPELINE_DETECTOR).bind(dumped),
                deployments.url_classifier.options(name=PIPELINE_CLASSIFIER).bind(dumped),
            ]
        actions = deployments.actions.options(name=ACTIONS).bind(
            config.actions.model_dump(mode="json"),
            str(config.base_dir),
            {name: asdict(r) for name, r in routes.items()},
        )
    ingress = IngressConfig(
        detectors={m.id: detector_name(m.id) for m in models},
        model_sizes={m.id: m.imgsz for m in models},
        settings=config.resolved_ingress(),
        streams=config.resolved_streams(),
        events=config.events,
        jobs=config.jobs.resolved(config.base_dir),
        pipelines=pipelines,
        url_pipelines=url_spec,
    )
    return deployments.ingress.options(name=INGRESS).bind(
        ingress, detectors, classifiers, actions, url_models
    )


def build_app(args: dict[str, Any]) -> Application:
    """`import_path: graph.app:build_app` — Serve passes the config's `args` here."""
    from deployments.actions import Actions
    from deployments.classifier import Classifier
    from deployments.detector import Detector
    from deployments.dynamic import PipelineClassifier, PipelineDetector
    from deployments.ingress import Ingress

    # @serve.deployment turns the classes into Deployments; mypy sees the classes.
    return build_graph(
        AppConfig.model_validate(args),
        Deployments(
            detector=cast(Deployment, Detector),
            ingress=cast(Deployment, Ingress),
            classifier=cast(Deployment, Classifier),
            actions=cast(Deployment, Actions),
            url_detector=cast(Deployment, PipelineDetector),
            url_classifier=cast(Deployment, PipelineClassifier),
        ),
    )
