"""`.mpta` archives and pipeline.json: every hostile archive is refused with a clear
error, nothing lands outside the cache, good archives load from a path or a real HTTP
server and are cached by sha256."""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import stat
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graph.cli import main as cli
from graph.config import PROJECT_ROOT
from graph.pipeline.archive import ArchiveError, ArchiveLimits, load_archive, pack_archive
from graph.pipeline.spec import PipelineFile
from graph.pipeline.templates import template_fields

DEMO = json.loads((PROJECT_ROOT / "models" / "demo-pipeline.json").read_text())
LIMITS = ArchiveLimits(max_members=16, max_total_bytes=64 * 1024**2)


def write_zip(path: Path, members: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (modes or {}).get(name, stat.S_IFREG | 0o644) << 16
            z.writestr(info, data)
    return path


def good_members(pipeline: dict[str, Any] | None = None) -> dict[str, bytes]:
    return {
        "pipeline.json": json.dumps(pipeline or DEMO).encode(),
        "demo-detector.onnx": b"onnx-bytes",
        "body-type.onnx": b"onnx-bytes-2",
    }


def refused(tmp_path: Path, archive: Path, *expected: str) -> list[str]:
    cache = tmp_path / "cache"
    before = sorted(p.name for p in tmp_path.iterdir() if p.name != "cache")
    with pytest.raises(ArchiveError) as info:
        load_archive(archive, cache, LIMITS)
    problems = info.value.problems
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    # Nothing was extracted: the cache holds no archive directory, no file appeared.
    assert not [p for p in cache.iterdir()] if cache.exists() else True
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == before
    return problems


def test_a_good_archive_is_extracted_once_and_cached_by_hash(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.mpta", good_members())
    first = load_archive(archive, tmp_path / "cache", LIMITS)
    assert (first.root / "demo-detector.onnx").read_bytes() == b"onnx-bytes"
    assert (
        first.root.name == first.sha256 and first.pipeline.pipeline.modelId == "demo_vehicle_det_v1"
    )
    (first.root / "marker").write_text("x")
    again = load_archive(archive, tmp_path / "cache", LIMITS)
    assert again.root == first.root and (again.root / "marker").exists()  # not re-extracted
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.sha256]


@pytest.mark.parametrize(
    "name, members, modes, expected",
    [
        ("traversal", {"../evil.onnx": b"x"}, None, "path traversal"),
        ("absolute", {"/tmp/evil.onnx": b"x"}, None, "absolute"),
        ("windows", {"C:\\evil.onnx": b"x"}, None, "absolute"),
        ("symlink", {"link.onnx": b"/etc/passwd"}, {"link.onnx": stat.S_IFLNK | 0o777}, "symbolic"),
        ("device", {"dev.onnx": b""}, {"dev.onnx": stat.S_IFCHR | 0o600}, "not a regular file"),
        ("too many", {f"f{i}.txt": b"x" for i in range(20)}, None, "more than 16"),
    ],
)
def test_hostile_members_are_refused_before_anything_is_extracted(
    tmp_path: Path,
    name: str,
    members: dict[str, bytes],
    modes: dict[str, int] | None,
    expected: str,
) -> None:
    archive = write_zip(tmp_path / f"{name}.mpta", {**good_members(), **members}, modes)
    refused(tmp_path, archive, expected)


def test_zip_bombs_are_refused_by_ratio_and_by_declared_size(tmp_path: Path) -> None:
    bomb = write_zip(tmp_path / "bomb.mpta", {**good_members(), "zeros.bin": bytes(32 * 1024**2)})
    refused(tmp_path, bomb, "compression ratio")
    big = ArchiveLimits(max_total_bytes=1024 * 1024, max_ratio=10_000)
    with pytest.raises(ArchiveError, match="declared size"):
        load_archive(bomb, tmp_path / "cache2", big)


def test_broken_pipeline_json_is_refused_with_json_paths(tmp_path: Path) -> None:
    members = good_members()
    refused(
        tmp_path,
        write_zip(tmp_path / "nojson.mpta", {**members, "pipeline.json": b"{not json"}),
        "not valid JSON",
    )
    refused(
        tmp_path,
        write_zip(
            tmp_path / "none.mpta", {k: v for k, v in members.items() if k != "pipeline.json"}
        ),
        "no pipeline.json",
    )
    bad = copy.deepcopy(DEMO)
    bad["pipeline"]["branches"][0]["bogus"] = 1
    bad["pipeline"]["minConfidence"] = 2
    problems = refused(tmp_path, write_zip(tmp_path / "schema.mpta", good_members(bad)))
    assert any(p.startswith("$.pipeline.branches[0].bogus: Extra inputs") for p in problems)
    assert any(p.startswith("$.pipeline.minConfidence:") for p in problems)


def test_a_model_file_named_but_missing_is_refused(tmp_path: Path) -> None:
    members = {k: v for k, v in good_members().items() if k != "body-type.onnx"}
    refused(tmp_path, write_zip(tmp_path / "m.mpta", members), "'body-type.onnx' is not in")


def test_the_seeds_connection_sections_are_accepted_ignored_and_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An archive with the seeds' redis / postgresql sections loads; their settings are
    ignored (the deployment's config says where data goes), `mpta validate` warns by
    their keys, and the password appears nowhere: not in the warning, not in
    `--json`, not in the pipeline that travels to the camera actors."""
    from graph.app import pipeline_models
    from graph.config import PipelineRef

    seed = {
        **copy.deepcopy(DEMO),
        "redis": {"host": "10.0.0.1", "port": 6379, "password": "hunter2"},
        "postgresql": {"host": "10.0.0.2", "database": "cms", "password": "hunter3"},
    }
    archive = write_zip(tmp_path / "s.mpta", good_members(seed))
    loaded = load_archive(str(archive), tmp_path / "cache", ArchiveLimits())
    warnings = loaded.pipeline.connection_warnings()
    assert [w.split(" section")[0] for w in warnings] == [
        "pipeline.json's redis",
        "pipeline.json's postgresql",
    ]
    assert "(host, password, port)" in warnings[0] and "actions.redis_url" in warnings[0]
    assert cli(["mpta", "validate", str(archive), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.count("warning: pipeline.json's") == 2
    travelling = loaded.pipeline.without_connections()
    assert travelling.redis is None and travelling.postgresql is None
    detector, _ = pipeline_models(PipelineRef(archive=str(archive)), loaded)
    assert detector.warnings == warnings
    for text in (out, err, repr(loaded.pipeline), *warnings, repr(travelling.__dict__)):
        assert "hunter" not in text and "10.0.0." not in text


@pytest.mark.parametrize(
    "table",
    ['events"; DROP TABLE x; --', "events;", "ünïcode", "1events", "a" * 64, "schema.table"],
)
def test_sql_identifiers_that_are_not_plain_are_refused(table: str) -> None:
    bad = copy.deepcopy(DEMO)
    bad["pipeline"]["actions"][1]["table"] = table
    with pytest.raises(ValueError, match="plain SQL identifier"):
        PipelineFile.model_validate(bad)
    bad = copy.deepcopy(DEMO)
    bad["pipeline"]["actions"][1]["fields"] = {table: "{camera_id}"}
    with pytest.raises(ValueError, match="plain SQL identifier"):
        PipelineFile.model_validate(bad)


def test_templates_may_only_name_context_fields_and_known_branches() -> None:
    assert template_fields("{camera_id}:{demo_bodytype_cls_v1.label}") == [
        "camera_id",
        "demo_bodytype_cls_v1.label",
    ]
    for template in (
        "{unknown_branch.label}",
        "{demo_bodytype_cls_v1.brand}",  # a body-type branch gives label/class/body_type
        "{nope}",
        "{camera_id!r}",
        "{confidence:.2f}",
        "{}",
    ):
        bad = copy.deepcopy(DEMO)
        bad["pipeline"]["parallelActions"][1]["message"] = template
        with pytest.raises(ValueError):
            PipelineFile.model_validate(bad)
    ok = copy.deepcopy(DEMO)  # the detector-worker's names for branch results
    ok["pipeline"]["parallelActions"][1]["message"] = (
        "{demo_bodytype_cls_v1.body_type} {demo_plate_ocr_v1.plate} {demo_plate_ocr_v1.confidence}"
    )
    PipelineFile.model_validate(ok)
    bad = copy.deepcopy(DEMO)
    bad["pipeline"]["parallelActions"][0]["waitForBranches"] = ["ghost"]
    with pytest.raises(ValueError, match="unknown branches"):
        PipelineFile.model_validate(bad)


@pytest.fixture()
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_archives_download_from_a_real_http_server_with_a_size_cap(
    tmp_path: Path, http_dir: tuple[Path, str]
) -> None:
    served, url = http_dir
    write_zip(served / "a.mpta", {**good_members(), "noise.bin": os.urandom(4096)})
    loaded = load_archive(f"{url}/a.mpta", tmp_path / "cache", LIMITS)
    assert (loaded.root / "pipeline.json").is_file()
    with pytest.raises(ArchiveError, match="larger than"):
        load_archive(f"{url}/a.mpta", tmp_path / "cache", ArchiveLimits(max_archive_bytes=1024))
    with pytest.raises(ArchiveError, match="HTTP 404"):
        load_archive(f"{url}/missing.mpta", tmp_path / "cache", LIMITS)


def test_the_cli_packs_validates_and_explains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.mpta"
    models = PROJECT_ROOT / "models"
    assert cli(["mpta", "pack", str(models / "demo-pipeline.json"), "--out", str(out)]) == 0
    assert (
        pack_archive(models / "demo-pipeline.json", tmp_path / "b.mpta").read_bytes()
        == out.read_bytes()
    )
    assert cli(["mpta", "inspect", str(out)]) == 0
    assert "demo_bodytype_cls_v1 [classifier]" in capsys.readouterr().out
    bad = write_zip(tmp_path / "bad.mpta", {**good_members(), "../x": b""})
    assert cli(["mpta", "validate", str(bad)]) == 1
    assert "path traversal" in capsys.readouterr().err
