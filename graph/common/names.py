"""The deployment graph's names: every deployment, actor and namespace name is built here.

Serve deployments are found by name (``serve.get_deployment_handle``) and Ray actors by
name and namespace (``ray.get_actor``); a name built anywhere else is a name that can
drift. serve_config.yaml's per-deployment overrides use the same names.
"""

from __future__ import annotations

# Camera, registry, EventHub and media-jobs actors live in one namespace, whatever
# namespace Serve runs in, so every ingress replica and camera actor finds them.
STREAMS_NAMESPACE = "camgraph"

ACTIONS = "Actions"
INGRESS = "Ingress"
# The multiplexed deployments of pipelines loaded from a subscription's modelUrl: the
# detector keyed by the archive's sha256, the classifier by "<sha256>:<branch modelId>".
PIPELINE_DETECTOR = "PipelineDetector"
PIPELINE_CLASSIFIER = "PipelineClassifier"


def detector_name(model_id: str) -> str:
    """Deployment name of a model's detector, as used in serve_config.yaml overrides."""
    return f"Detector_{model_id}"


def classifier_name(model_id: str) -> str:
    """Deployment name of a branch model, as used in serve_config.yaml overrides."""
    return f"Classifier_{model_id}"


def registry_name(app_name: str) -> str:
    return f"camgraph-registry-{app_name}"


def camera_actor_name(app_name: str, index: int) -> str:
    return f"camgraph-cameras-{app_name}-{index}"


def hub_name(app_name: str) -> str:
    return f"camgraph-events-{app_name}"


def jobs_actor_name(app_name: str) -> str:
    return f"camgraph-jobs-{app_name}"


def catalog_name(app_name: str) -> str:
    """The actor that loads and tracks the pipelines subscriptions name by modelUrl."""
    return f"camgraph-pipelines-{app_name}"


# camgraph's own tables beside a user's (the outbox, revisions, the local store's
# bookkeeping): no pipeline action may write them.
RESERVED_TABLES = frozenset({"saved_images", "published_messages"})


def is_reserved_table(name: str) -> bool:
    return name.lower().startswith("camgraph_") or name.lower() in RESERVED_TABLES
