"""`.mpta` archives and pipeline.json: every hostile archive is refused with a clear
error, nothing lands outside the cache, good archives load from a path or a real HTTP
server and are cached by sha256."""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import http.server
import json
import os
import stat
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from graph.cli import main as cli
from graph.common.netpolicy import REFUSED
from graph.config import PROJECT_ROOT
from graph.pipeline.archive import (
    ArchiveError,
    ArchiveLimits,
    LoadedArchive,
    UrlCheck,
    cached_archive,
    load_archive,
    pack_archive,
    sha256_of,
)
from graph.pipeline.catalog import UrlPipelineSettings, UrlPipelinesSpec
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
    kept = [p.name for p in (tmp_path / "cache").iterdir() if p.name != ".locks"]
    assert kept == [first.sha256]


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


# ---- archives a client named by URL: the URL policy, the node cache and its lock --------

ALLOWED_PATH = "/models/"


def _redirecting_handler(
    archive: bytes, requested: list[str]
) -> type[http.server.BaseHTTPRequestHandler]:
    """Serves `archive` at /models/ok.mpta and /other/ok.mpta, and redirects (302) from
    /models/<name> to where REDIRECTS says; records every path requested."""
    redirects = {
        "/models/inside": "/models/ok.mpta",  # relative, inside the allow-list
        "/models/outside": "/other/ok.mpta",  # same server, outside the allow-list
        "/models/hop": "/models/outside",  # inside, then outside
        "/models/metadata": "http://169.254.169.254/latest/ok.mpta",
        "/models/file": "file:///etc/passwd",
        "/models/ftp": "ftp://cms.example/models/ok.mpta",
        "/models/creds": "http://cms.example@evil.example/models/ok.mpta",
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path in ("/models/ok.mpta", "/other/ok.mpta"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(archive)))
                self.end_headers()
                self.wfile.write(archive)
            else:
                self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def _redirect_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, list[str], bytes]]:
    from tests.peers import http_server

    served = tmp_path_factory.mktemp("served") / "served.mpta"
    archive = write_zip(served, good_members()).read_bytes()
    requested: list[str] = []
    with http_server(_redirecting_handler(archive, requested)) as base:
        yield base, requested, archive  # one server: each shutdown takes 0.5 s


@pytest.fixture()
def redirecting(
    _redirect_server: tuple[str, list[str], bytes],
) -> tuple[str, list[str], bytes]:
    """A real server (base URL), the paths it was asked for, and the archive it serves."""
    _redirect_server[1].clear()
    return _redirect_server


def url_check_for(tmp_path: Path, *allowed: str) -> UrlCheck:
    spec = UrlPipelinesSpec(
        settings=UrlPipelineSettings(allowed_urls=allowed),
        archive_cache_dir=tmp_path / "cache",
        onnx_cache_dir=tmp_path / "onnx",
    )
    return spec.url_check()


def nothing_in(cache: Path) -> bool:
    """No archive directory, no download left behind (the lock folder may exist)."""
    return not cache.exists() or [p.name for p in cache.iterdir() if p.name != ".locks"] == []


def test_a_checked_load_refuses_local_paths(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.mpta", good_members())
    cache = tmp_path / "cache"
    for source in (archive, str(archive), f"file://{archive}", "ftp://cms.example/a.mpta"):
        with pytest.raises(ArchiveError) as info:
            load_archive(source, cache, LIMITS, check=lambda url: None)
        assert info.value.problems == ["only http(s) URLs are fetched"]
        assert nothing_in(cache)
    assert load_archive(archive, cache, LIMITS).root.is_dir()  # no check: paths load


def test_a_checked_load_refuses_a_url_before_connecting(
    tmp_path: Path, redirecting: tuple[str, list[str], bytes]
) -> None:
    base, requested, _ = redirecting
    cache = tmp_path / "cache"
    seen: list[str] = []

    def check(url: str) -> str | None:
        seen.append(url)
        return "not today"

    with pytest.raises(ArchiveError) as info:
        load_archive(f"{base}/models/ok.mpta", cache, LIMITS, check=check)
    assert (info.value.source, info.value.problems) == (
        f"{base}/models/ok.mpta",
        ["refused: not today"],
    )
    assert seen == [f"{base}/models/ok.mpta"] and requested == []
    assert nothing_in(cache)
    with pytest.raises(ArchiveError, match=r"refused: not under any of pipelines\.allowed_urls"):
        load_archive(f"{base}/other/ok.mpta", cache, LIMITS, url_check_for(tmp_path, base + "/m/"))
    assert requested == []


@pytest.mark.parametrize(
    "path, reason, followed",
    [
        ("/models/outside", "not under any of pipelines.allowed_urls", ["/models/outside"]),
        (
            "/models/hop",
            "not under any of pipelines.allowed_urls",
            ["/models/hop", "/models/outside"],
        ),
        ("/models/metadata", REFUSED, ["/models/metadata"]),
        ("/models/ftp", "only http(s) URLs with a host are fetched", ["/models/ftp"]),
        ("/models/creds", "credentials in the URL are not accepted", ["/models/creds"]),
    ],
)
def test_redirects_outside_the_allow_list_are_refused(
    tmp_path: Path,
    redirecting: tuple[str, list[str], bytes],
    path: str,
    reason: str,
    followed: list[str],
) -> None:
    base, requested, _ = redirecting
    cache = tmp_path / "cache"
    check = url_check_for(tmp_path, base + ALLOWED_PATH, "http://169.254.169.254/")
    with pytest.raises(ArchiveError) as info:
        load_archive(f"{base}{path}", cache, LIMITS, check)
    assert info.value.problems == [f"redirect refused: {reason}"]
    assert "redirect refused" in str(info.value)
    assert info.value.source == f"{base}{followed[-1]}"  # the request that redirected
    assert requested == followed  # the refused target was never asked for
    assert nothing_in(cache) and not (cache / ".locks").exists()


def test_redirects_to_local_files_are_refused_with_or_without_a_check(
    tmp_path: Path, redirecting: tuple[str, list[str], bytes]
) -> None:
    base, requested, _ = redirecting
    check = url_check_for(tmp_path, base + ALLOWED_PATH)
    for chosen in (check, None):  # urllib itself refuses a redirect to file://
        with pytest.raises(ArchiveError) as info:
            load_archive(f"{base}/models/file", tmp_path / "cache", LIMITS, chosen)
        assert info.value.problems == ["download failed: HTTP 302"]
    assert requested == ["/models/file", "/models/file"]
    assert nothing_in(tmp_path / "cache")


def test_redirects_inside_the_allow_list_are_followed(
    tmp_path: Path, redirecting: tuple[str, list[str], bytes]
) -> None:
    base, requested, archive = redirecting
    check = url_check_for(tmp_path, base + ALLOWED_PATH)
    loaded = load_archive(f"{base}/models/inside", tmp_path / "cache", LIMITS, check)
    assert requested == ["/models/inside", "/models/ok.mpta"]
    assert loaded.sha256 == hashlib.sha256(archive).hexdigest()
    assert (loaded.root / "demo-detector.onnx").read_bytes() == b"onnx-bytes"
    # Without a check (an operator's own configured archive) redirects are not policed.
    requested.clear()
    loaded = load_archive(f"{base}/models/outside", tmp_path / "cache2", LIMITS)
    assert requested == ["/models/outside", "/other/ok.mpta"]
    assert loaded.sha256 == hashlib.sha256(archive).hexdigest()


def test_cached_archive_returns_only_what_this_node_extracted(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.mpta", good_members())
    digest = sha256_of(archive)
    cache = tmp_path / "cache"
    assert cached_archive(cache, digest, "pipeline x") is None  # no cache folder yet
    assert not cache.exists()
    loaded = load_archive(archive, cache, LIMITS)
    found = cached_archive(cache, digest, "pipeline x")
    assert found == LoadedArchive(digest, cache / digest, loaded.pipeline)
    assert found is not None and found.pipeline.pipeline.modelId == "demo_vehicle_det_v1"
    for bad in (digest[:63], digest + "0", "../" + digest[3:], "/" + digest[1:], "", "g" * 65):
        assert cached_archive(cache, bad, "pipeline x") is None, bad
    assert [p.name for p in (cache / ".locks").iterdir()] == [digest]  # no lock for bad ones
    assert cached_archive(cache, "a" * 64, "pipeline x") is None  # well formed, not here
    # A partial directory (a crash mid-extraction) is no cached archive ...
    other = write_zip(tmp_path / "b.mpta", {**good_members(), "extra.txt": b"x"})
    partial = cache / sha256_of(other)
    partial.mkdir()
    (partial / "demo-detector.onnx").write_bytes(b"half")
    assert cached_archive(cache, partial.name, "pipeline y") is None
    # ... and the next load replaces it whole.
    again = load_archive(other, cache, LIMITS)
    assert again.root == partial and (partial / "pipeline.json").is_file()
    assert (partial / "demo-detector.onnx").read_bytes() == b"onnx-bytes"
    assert cached_archive(cache, partial.name, "pipeline y") is not None


def _hold_lock(cache: Path, digest: str) -> Any:
    """The node lock as another replica (process) would hold it: its own open file."""
    (cache / ".locks").mkdir(parents=True, exist_ok=True)
    handle = (cache / ".locks" / digest).open("a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def test_extraction_and_cache_lookups_wait_for_the_node_lock(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.mpta", good_members())
    digest, cache = sha256_of(archive), tmp_path / "cache"
    results: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, call()), daemon=True)
        thread.start()
        return thread

    handle = _hold_lock(cache, digest)
    loading = run("load", lambda: load_archive(archive, cache, LIMITS))
    loading.join(0.2)
    assert loading.is_alive() and not (cache / digest).exists()  # waits: nothing extracted
    fcntl.flock(handle, fcntl.LOCK_UN)
    loading.join(5)
    assert not loading.is_alive() and results["load"].root == cache / digest

    fcntl.flock(handle, fcntl.LOCK_EX)
    lookup = run("cached", lambda: cached_archive(cache, digest, "pipeline x"))
    lookup.join(0.2)
    assert lookup.is_alive() and "cached" not in results
    fcntl.flock(handle, fcntl.LOCK_UN)
    lookup.join(5)
    assert not lookup.is_alive() and results["cached"].root == cache / digest
    # Released after each use: another holder gets it at once.
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.close()
