"""Builds the camgraph Serve application from `serve_config.yaml` arguments."""

from __future__ import annotations

from typing import Any, cast

from ray.serve import Application
from ray.serve.deployment import Deployment

from graph.config import AppConfig, detector_name


def build_graph(config: AppConfig, *, detector: Deployment, ingress: Deployment) -> Application:
    """Bind one detector deployment per model and the ingress that routes to them.

    The deployment classes come in as arguments so tests can build the graph without
    a cluster and see exactly what was bound.
    """
    models = config.resolved_models()
    detectors = {
        m.id: detector.options(name=detector_name(m.id)).bind(m.model_dump(mode="json"))
        for m in models
    }
    sizes = {m.id: m.imgsz for m in models}
    return ingress.options(name="Ingress").bind(
        detectors,
        sizes,
        config.ingress.model_dump(mode="json"),
        config.resolved_streams().model_dump(mode="json"),
    )


def build_app(args: dict[str, Any]) -> Application:
    """`import_path: graph.app:build_app` — Serve passes the config's `args` here."""
    from deployments.detector import Detector
    from deployments.ingress import Ingress

    # @serve.deployment turns the classes into Deployments; mypy sees the classes.
    return build_graph(
        AppConfig.model_validate(args),
        detector=cast(Deployment, Detector),
        ingress=cast(Deployment, Ingress),
    )
