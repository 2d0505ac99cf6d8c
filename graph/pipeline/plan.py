"""The static plan of a pipeline, built once from its spec (no Ray).

Which detections the pipeline keeps (`expectedClasses`) and follows (`triggerClasses`,
`minConfidence`), which branches (classifiers) run for which parent label, on which
image (`crop`, `cropClass`), with which timeout and result threshold, in which order
(parallel or one after another, children after their parent), and which actions the
pipeline holds, each with the branches it waits for: those it names in its templates
(`<branch>.<field>`) or in `waitForBranches`, plus the branch it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    min_confidence: float  # of the branch's own result (the seed's); below: no result
    parallel: bool
    aliases: tuple[str, ...]  # extra names of the label in templates (e.g. body_type)
    children: tuple[BranchPlan, ...]
    crop: bool = True  # False: the whole frame is classified
    crop_class: str | None = None  # None: the object's own class
    timeout_s: float | None = None  # None: BranchSettings.branch_timeout_s

    @classmethod
    def of(cls, node: Node) -> BranchPlan:
        return cls(
            node.modelId,
            frozenset(node.triggerClasses),
            node.minConfidence,
            node.parallel,
            tuple(sorted(branch_result_fields(node) - {"label", "class", "confidence"})),
            tuple(cls.of(b) for b in node.branches),
            node.crop,
            node.cropClass,
            node.timeout_seconds,
        )

    def walk(self) -> list[BranchPlan]:
        """This branch and every branch below it, depth first."""
        out = [self]
        for child in self.children:
            out += child.walk()
        return out

    def triggers(self, parent_label: str) -> bool:
        """Whether this branch runs for an object (or a parent result) labelled so.

        Only the label decides: `minConfidence` applies to the branch's own result, as in
        the detector-worker (a result below it counts as nothing found), not to the
        parent's confidence (the root's `minConfidence` already gates the detection)."""
        return not self.trigger_classes or parent_label in self.trigger_classes

    def accepts(self, confidence: float) -> bool:
        """Whether a result of this confidence counts (else: nothing found, no vote)."""
        return confidence >= self.min_confidence

    def source(self, object_class: str) -> str | None:
        """What this branch classifies for an object of `object_class`: the crop of a
        detection of the returned class that belongs to the object (its own class: the
        object itself), or None for the whole frame (`crop` false, the seed's default)."""
        if not self.crop:
            return None
        return self.crop_class or object_class


@dataclass(frozen=True)
class ActionPlan:
    index: int  # position in the pipeline, part of the idempotency key
    node_id: str
    action: Any  # one of graph.pipeline.spec's action models
    needs: frozenset[str]  # branches that must have run (or been given up) first
    # Branches that must have run, never given up: a branch's own actions run only
    # after the branch itself did (as in the detector-worker).
    requires: frozenset[str] = frozenset()
    # A record action's key column and the template of its key (a create without its
    # own takes its table's update's: the row the update looks for is the one it made).
    key_field: str | None = None
    key_value: str | None = None


@dataclass(frozen=True)
class PipelinePlan:
    pipeline_id: str
    version: str
    trigger_classes: frozenset[str]
    min_confidence: float
    branches: tuple[BranchPlan, ...]
    actions: tuple[ActionPlan, ...]
    # The root's `expectedClasses`: detections of other classes are dropped before
    # tracking (by the processor). None (or an empty list): every class is kept.
    expected_classes: frozenset[str] | None = None

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
                actions.append(
                    ActionPlan(len(actions), node.modelId, action, frozenset(needs), frozenset(own))
                )
        return cls(
            root.modelId,
            version,
            frozenset(root.triggerClasses),
            root.minConfidence,
            tuple(BranchPlan.of(b) for b in root.branches),
            tuple(_with_keys(actions)),
            frozenset(root.expectedClasses) if root.expectedClasses else None,
        )

    def all_branches(self) -> list[BranchPlan]:
        """Every branch, nested ones too, depth first."""
        return [b for top in self.branches for b in top.walk()]

    def keeps(self, label: str) -> bool:
        """Whether a detection of this class is kept at all (`expectedClasses`)."""
        return self.expected_classes is None or label in self.expected_classes

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
                if plan.key_field is not None:
                    cols.add(plan.key_field)
        return out


@dataclass(frozen=True)
class PipelineRuntime:
    """What a camera actor needs to run a pipeline: the plan and the deployment names."""

    plan: PipelinePlan
    classifier_names: dict[str, str]  # branch model id → Serve deployment name
    actions_name: str
    # sink → route name ("redis" → "redis@<digest>"): the archive's own connections
    # (actions.archive_connections: use); empty: the deployment's sinks
    sink_routes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        pipeline: PipelineFile,
        version: str,
        classifier_names: dict[str, str],
        actions_name: str,
        sink_routes: dict[str, str] | None = None,
    ) -> PipelineRuntime:
        return cls(
            PipelinePlan.of(pipeline, version),
            dict(classifier_names),
            actions_name,
            dict(sink_routes or {}),
        )


def _with_keys(actions: list[ActionPlan]) -> list[ActionPlan]:
    """Each record action with its key: an update's own; a create's own (its key value
    `{session_id}` by default), else that of the first update of its table, whose
    branch names it then waits for too."""
    updates = [p.action for p in actions if isinstance(p.action, PostgresUpdateCombined)]
    out = []
    for plan in actions:
        action = plan.action
        if isinstance(action, PostgresUpdateCombined):
            plan = replace(plan, key_field=action.key_field, key_value=action.key_value)
        elif isinstance(action, PostgresCreateRecord):
            field, value = action.key_field, action.key_value
            if field is None:
                update = next((u for u in updates if u.table == action.table), None)
                if update is not None:
                    field, value = update.key_field, update.key_value
            if field is not None:
                value = value or "{session_id}"
                names = {n.partition(".")[0] for n in template_fields(value) if "." in n}
                needs = plan.needs | (names - {SESSION_NAMESPACE})
                plan = replace(plan, key_field=field, key_value=value, needs=needs)
        out.append(plan)
    return out
