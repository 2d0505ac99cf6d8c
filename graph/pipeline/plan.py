"""The static plan of a pipeline, built once from its spec (no Ray).

Which branches (classifiers) run for which parent label and confidence, in which order
(parallel or one after another, children after their parent), and which actions the
pipeline holds, each with the branches it waits for: those it names in its templates
(`<branch>.<field>`) or in `waitForBranches`, plus the branch it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graph.pipeline.spec import (
    Node,
    PipelineFile,
    PostgresCreateRecord,
    PostgresUpdateCombined,
    action_templates,
    branch_result_fields,
)
from graph.pipeline.templates import SESSION_NAMESPACE, template_fields


@dataclass(frozen=True)
class BranchPlan:
    model_id: str
    trigger_classes: frozenset[str]  # empty: any parent label
    min_confidence: float
    parallel: bool
    aliases: tuple[str, ...]  # extra names of the label in templates (e.g. body_type)
    children: tuple[BranchPlan, ...]

    @classmethod
    def of(cls, node: Node) -> BranchPlan:
        return cls(
            node.modelId,
            frozenset(node.triggerClasses),
            node.minConfidence,
            node.parallel,
            tuple(sorted(branch_result_fields(node) - {"label", "class", "confidence"})),
            tuple(cls.of(b) for b in node.branches),
        )

    def triggers(self, parent_label: str, parent_confidence: float) -> bool:
        """Whether this branch runs on a crop its parent labelled so."""
        classes = self.trigger_classes
        return (not classes or parent_label in classes) and parent_confidence >= self.min_confidence


@dataclass(frozen=True)
class ActionPlan:
    index: int  # position in the pipeline, part of the idempotency key
    node_id: str
    action: Any  # one of graph.pipeline.spec's action models
    needs: frozenset[str]  # branches that must have a result first


@dataclass(frozen=True)
class PipelinePlan:
    pipeline_id: str
    version: str
    trigger_classes: frozenset[str]
    min_confidence: float
    branches: tuple[BranchPlan, ...]
    actions: tuple[ActionPlan, ...]

    @classmethod
    def of(cls, pipeline: PipelineFile, version: str) -> PipelinePlan:
        root = pipeline.pipeline
        actions: list[ActionPlan] = []
        for node in root.walk():
            own = {node.modelId} if node is not root else set()
            for action in [*node.actions, *node.parallelActions]:
                needs = set(own)
                for template in action_templates(action):
                    needs |= {n.partition(".")[0] for n in template_fields(template) if "." in n}
                needs.discard(SESSION_NAMESPACE)  # session data never waits for a branch
                if isinstance(action, PostgresUpdateCombined):
                    needs |= set(action.waitForBranches)
                actions.append(ActionPlan(len(actions), node.modelId, action, frozenset(needs)))
        return cls(
            root.modelId,
            version,
            frozenset(root.triggerClasses),
            root.minConfidence,
            tuple(BranchPlan.of(b) for b in root.branches),
            tuple(actions),
        )

    def triggers(self, label: str, confidence: float) -> bool:
        """Whether a detection of this label and confidence runs the pipeline."""
        classes = self.trigger_classes
        return (not classes or label in classes) and confidence >= self.min_confidence

    def tables(self) -> dict[str, set[str]]:
        """Every PostgreSQL table the actions write, with its columns."""
        out: dict[str, set[str]] = {}
        for plan in self.actions:
            a = plan.action
            if isinstance(a, PostgresCreateRecord):
                cols = out.setdefault(a.table, set())
                cols |= set(a.fields)
                if isinstance(a, PostgresUpdateCombined):
                    cols.add(a.key_field)
        return out


@dataclass(frozen=True)
class PipelineRuntime:
    """What a camera actor needs to run a pipeline: the plan and the deployment names."""

    plan: PipelinePlan
    classifier_names: dict[str, str]  # branch model id → Serve deployment name
    actions_name: str

    @classmethod
    def of(
        cls,
        pipeline: PipelineFile,
        version: str,
        classifier_names: dict[str, str],
        actions_name: str,
    ) -> PipelineRuntime:
        return cls(PipelinePlan.of(pipeline, version), dict(classifier_names), actions_name)
