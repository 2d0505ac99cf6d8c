"""`pipeline.json` (the detector-worker format) as validated pydantic models, pure.

A pipeline is a tree: the root detector with `triggerClasses` / `minConfidence`, its
`actions`, its `branches` (classifiers or OCR on crops, possibly nested, possibly
`parallel`) and its `parallelActions`, which may wait for branches and fill fields from
their results with templates such as `{car_brand_cls_v1.brand}`.

Archives are untrusted: identifiers that end up in SQL must be plain identifiers, model
files must be relative paths inside the archive, templates may only name known context
fields or branches, and connection settings (hosts, passwords) are never accepted inside
an archive — they come from the deployment's configuration.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from graph.common.names import is_reserved_table
from graph.common.schemas import MODEL_ID_PATTERN, StrictModel
from graph.pipeline.templates import SESSION_NAMESPACE, template_fields

# A pipeline's model ids name deployments (`Detector_<id>`), models of /detect and the
# `{<model id>.<field>}` templates (a dot would be ambiguous there): the one pattern.
MODEL_ID = MODEL_ID_PATTERN
# SQL identifiers: letters, digits, underscore; not starting with a digit; Postgres' 63.
SQL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# What a template may name besides branch results ({<branch modelId>.<field>}).
CONTEXT_FIELDS = frozenset(
    {
        "camera_id",
        "display_id",
        "subscription_id",
        "session_id",
        "track_id",
        "class",
        "label",
        "confidence",
        "timestamp",
        "frame_seq",
        "pipeline_id",
        "pipeline_version",
        "model_id",
        "object_id",
        "x1",
        "y1",
        "x2",
        "y2",
    }
)


def _identifier(value: str) -> str:
    if not SQL_IDENTIFIER.match(value):
        raise ValueError(
            f"{value!r} is not a plain SQL identifier (letters, digits, _; at most 63)"
        )
    return value


def _user_table(value: str) -> str:
    """A table an archive may write: not one of camgraph's own (its outbox, revisions,
    the local store's bookkeeping), whose rows an archive must never reach."""
    _identifier(value)
    if is_reserved_table(value):
        raise ValueError(f"{value!r} is one of camgraph's own tables")
    return value


# Context fields that identify an object's record and never change for it: what a record
# key may be built from (a branch result may change between passes, session data is a
# client's), and one of the first two must be in it (else one key could name many rows).
KEY_FIELDS = frozenset({"session_id", "object_id", "camera_id", "display_id", "track_id"})
KEY_ANCHORS = frozenset({"session_id", "object_id"})


def _key_template(value: str | None) -> str | None:
    if value is None:
        return None
    names = set(template_fields(value))
    if not names <= KEY_FIELDS or not names & KEY_ANCHORS:
        raise ValueError(
            f"key_value {value!r}: a record key may name only {sorted(KEY_FIELDS)}, and "
            "must name {session_id} or {object_id}"
        )
    return value


class RedisSaveImage(StrictModel):
    type: Literal["redis_save_image"]
    region: str | None = Field(None, description="class whose crop is saved; None: the frame")
    key: str = Field(min_length=1, max_length=512, description="key template")
    expire_seconds: int = Field(3600, ge=1, le=30 * 24 * 3600, description="TTL")
    quality: int = Field(90, ge=10, le=100, description="JPEG quality")


class RedisPublish(StrictModel):
    type: Literal["redis_publish"]
    channel: str = Field(min_length=1, max_length=256)
    message: str = Field(min_length=1, max_length=8192, description="message template")


class PostgresCreateRecord(StrictModel):
    """The seed's create: INSERT a row (once per object) whose `key_field` holds the
    object's key. Without `key_field` (the seeds' archives name none) it takes the key
    of an update of the same table in the pipeline; with neither, the row is inserted
    once and never updated."""

    type: Literal["postgresql_create_record"]
    table: str
    fields: dict[str, str] = Field(min_length=1, max_length=200)
    key_field: str | None = Field(
        None, description="camgraph: the column the row's key goes to (default: the update's)"
    )
    key_value: str | None = Field(
        None, description="camgraph: template of the key (default: the update's, {session_id})"
    )

    _table = field_validator("table")(_user_table)
    _key_value = field_validator("key_value")(_key_template)

    @field_validator("key_field")
    @classmethod
    def _key_column(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value)

    @field_validator("fields")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        for column in value:
            _identifier(column)
        return value


class PostgresUpdateCombined(PostgresCreateRecord):
    """The seed's update: `UPDATE <table> SET <fields> WHERE <key_field> = <key>`, the key
    being the object's `{session_id}` as in the seed (`key_value`: camgraph's, to name
    another)."""

    type: Literal["postgresql_update_combined"]  # type: ignore[assignment]
    key_field: str = Field(description="column that identifies the record (e.g. session_id)")
    key_value: str = Field("{session_id}", description="camgraph: template of the key")
    waitForBranches: list[str] = Field(default_factory=list)


Action = Annotated[
    RedisSaveImage | RedisPublish | PostgresCreateRecord | PostgresUpdateCombined,
    Field(discriminator="type"),
]


class Node(StrictModel):
    """The root detector or a branch."""

    modelId: str = Field(pattern=MODEL_ID)
    modelFile: str | None = Field(None, max_length=255, description="path inside the archive")
    modelType: Literal["detector", "classifier", "ocr"] | None = None
    engine: str | None = Field(None, max_length=64, description="e.g. rapidocr for OCR")
    imgsz: int | None = Field(None, ge=32, le=4096, multiple_of=32)
    triggerClasses: list[str] = Field(default_factory=list, max_length=1000)
    expectedClasses: list[str] | None = Field(
        None,
        max_length=1000,
        description="root: detections of other classes are dropped before tracking",
    )
    minConfidence: float = Field(
        0.5,
        ge=0,
        le=1,
        description="root: the detection's; branch: its own result's (below: no result)",
    )
    crop: bool = Field(False, description="branch: classify a crop (false: the whole frame)")
    cropClass: str | None = Field(
        None, max_length=128, description="branch: the class whose crop (default the object's)"
    )
    timeout_seconds: float | None = Field(
        None,
        gt=0,
        le=300,
        description="branch: how long one classification may take (default: settings)",
    )
    parallel: bool = False
    resultField: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="extra name of a branch's label in templates, e.g. brand",
    )
    branches: list[Node] = Field(default_factory=list, max_length=64)
    actions: list[Action] = Field(default_factory=list, max_length=64)
    parallelActions: list[Action] = Field(default_factory=list, max_length=64)

    @field_validator("modelFile")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.replace("\\", "/").split("/")
        if value.startswith(("/", "\\")) or ":" in value or ".." in parts or "" in parts:
            raise ValueError(f"{value!r} must be a relative path inside the archive")
        if not value.endswith((".onnx", ".pt")):
            raise ValueError(f"{value!r}: model files are .onnx or .pt")
        return value

    @model_validator(mode="after")
    def _needs_a_model(self) -> Node:
        if self.modelFile is None and self.modelType != "ocr":
            raise ValueError("modelFile is required (except for modelType 'ocr')")
        return self

    def walk(self) -> list[Node]:
        """This node and every branch below it, depth first."""
        out = [self]
        for branch in self.branches:
            out += branch.walk()
        return out


class PipelineFile(StrictModel):
    """The whole `pipeline.json`."""

    pipeline: Node
    version: str | None = Field(None, max_length=64, description="pipeline version label")

    # The seeds' connection sections (001 "MPTA Structure": Redis configuration in the
    # archive). Accepted and ignored: a downloaded archive must not choose where data
    # goes or hold a password camgraph would keep. Never dumped (`mpta validate --json`),
    # dropped before a pipeline travels (`without_connections`), named in warnings by
    # their keys only.
    redis: dict[str, Any] | None = Field(None, exclude=True, repr=False)
    postgresql: dict[str, Any] | None = Field(None, exclude=True, repr=False)

    def connection_warnings(self) -> list[str]:
        """What `mpta validate` and `/health` say of the connection sections."""
        out = []
        for name, section, setting in (
            ("redis", self.redis, "actions.redis_url"),
            ("postgresql", self.postgresql, "actions.postgres_dsn"),
        ):
            if section is not None:
                keys = ", ".join(sorted(map(str, section))[:20]) or "empty"
                out.append(
                    f"pipeline.json's {name} section ({keys}) is ignored: an archive does "
                    f"not choose where data goes; {setting} in serve_config.yaml does"
                )
        return out

    def without_connections(self) -> PipelineFile:
        """This pipeline without its connection sections (passwords stay in the file)."""
        return self.model_copy(update={"redis": None, "postgresql": None})

    @model_validator(mode="after")
    def _references(self) -> PipelineFile:
        nodes = self.pipeline.walk()
        ids = [n.modelId for n in nodes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"modelId must be unique in a pipeline, repeated: {duplicates}")
        if SESSION_NAMESPACE in ids:
            raise ValueError(
                f"modelId {SESSION_NAMESPACE!r} is reserved: {{{SESSION_NAMESPACE}.<field>}} "
                "names the session's data in templates"
            )
        branch_fields = {n.modelId: branch_result_fields(n) for n in nodes[1:]}
        branch_ids = set(branch_fields)
        problems = []
        expected = self.pipeline.expectedClasses
        for node in nodes[1:]:
            if expected and node.crop and node.cropClass and node.cropClass not in expected:
                problems.append(
                    f"branch {node.modelId}: cropClass {node.cropClass!r} is not in "
                    "expectedClasses, whose other detections are dropped: it would never run"
                )
        for node in nodes:
            for action in [*node.actions, *node.parallelActions]:
                problems += _template_problems(action, branch_fields)
                if isinstance(action, PostgresUpdateCombined):
                    unknown = sorted(set(action.waitForBranches) - branch_ids)
                    if unknown:
                        problems.append(f"waitForBranches names unknown branches {unknown}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def action_templates(action: Any) -> list[str]:
    """Every template of an action: key, channel, message, key_value and field values."""
    templates = [getattr(action, n, None) for n in ("key", "channel", "message", "key_value")]
    return [t for t in templates if isinstance(t, str)] + list(
        getattr(action, "fields", {}).values()
    )


def branch_result_fields(node: Node) -> set[str]:
    """What `{<branch>.<field>}` may name: label, class and confidence of the winning
    label, `resultField`, and the detector-worker's names (brand and body_type by model
    id, text and plate for OCR)."""
    fields = {"label", "class", "confidence"}
    if node.resultField:
        fields.add(node.resultField)
    model_id = node.modelId.lower()
    if "brand" in model_id:
        fields.add("brand")
    if "bodytype" in model_id or "body_type" in model_id:
        fields.add("body_type")
    if node.modelType == "ocr":
        fields |= {"text", "plate"}
    return fields


def _client_free(action: Any) -> set[str]:
    """Templates that must not hold client data: a Redis key or channel (a client could
    otherwise write any key or publish on any channel under the pipeline's prefix)."""
    if isinstance(action, RedisSaveImage):
        return {action.key}
    if isinstance(action, RedisPublish):
        return {action.channel}
    return set()


def _template_problems(action: Any, branch_fields: dict[str, set[str]]) -> list[str]:
    problems = []
    for template in action_templates(action):
        try:
            names = template_fields(template)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        for name in names:
            head, _, field = name.partition(".")
            if field and head in branch_fields:
                if field not in branch_fields[head]:
                    problems.append(
                        f"{action.type}: template field {{{name}}}: branch {head} gives "
                        f"{', '.join(sorted(branch_fields[head]))}"
                    )
                continue
            if not field and name in CONTEXT_FIELDS:
                continue
            if head == SESSION_NAMESPACE and field:
                if template in _client_free(action):
                    problems.append(
                        f"{action.type}: {{{name}}} is data a client sets (patchSession): "
                        "not allowed in a Redis key or channel"
                    )
                continue  # any field of the session's data (patchSession); NULL while absent
            problems.append(
                f"{action.type}: template field {{{name}}} is not a context field "
                f"({', '.join(sorted(CONTEXT_FIELDS))}), <branch modelId>.<field> "
                "nor session.<field>"
            )
    return problems


def json_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a JSON path, e.g. $.pipeline.branches[0].modelFile
    (the tags of tagged unions, such as 'redis_publish', are left out)."""
    path = "$"
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in {"redis_save_image", "redis_publish"} or part.startswith("postgresql_"):
            continue
        else:
            path += f".{part}"
    return path


def validation_problems(exc: ValidationError) -> list[str]:
    """Every problem of a ValidationError, one line each, with its JSON path."""
    return [
        f"{json_path(tuple(e['loc']))}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)
    ]
