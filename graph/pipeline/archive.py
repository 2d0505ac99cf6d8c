"""`.mpta` archives (zip: `pipeline.json` + model files), treated as untrusted input.

`load_archive` takes a path or an http(s) URL, caps the download, keys a cache by the
archive's sha256, checks every member before extracting anything (no absolute paths, no
`..`, no links, no devices, bounded member count, declared and actual sizes, compression
ratio), validates `pipeline.json` with pydantic, checks that every model file it names is
in the archive, and only then extracts — into a temporary directory, where `.pt` files
are checked for what their pickles would import (`graph.pipeline.ptscan`), renamed into the
cache when complete, so a half-extracted or unsafe archive is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import Field, ValidationError

from graph.common.errors import CamgraphError
from graph.common.schemas import StrictModel
from graph.pipeline.ptscan import pt_bytes_problems, pt_problems
from graph.pipeline.spec import PipelineFile, validation_problems

PIPELINE_JSON = "pipeline.json"


class ArchiveError(CamgraphError):
    """An archive was refused; `problems` lists every reason (JSON paths for the schema)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(source, problems)
        self.source, self.problems = source, problems

    def __str__(self) -> str:
        return f"{self.source}: " + "; ".join(self.problems)


class ArchiveLimits(StrictModel):
    max_archive_bytes: int = Field(2 * 1024**3, ge=1024, description="download / file size")
    max_members: int = Field(64, ge=1, le=100_000)
    max_total_bytes: int = Field(4 * 1024**3, ge=1024, description="uncompressed, all members")
    max_ratio: float = Field(200.0, ge=1, description="uncompressed / compressed per member")
    download_timeout_s: float = Field(60.0, gt=0, le=3600, description="per read")
    download_total_s: float = Field(
        1800.0, gt=0, le=86400, description="a whole download (a slow-drip server ends here)"
    )


@dataclass(frozen=True)
class LoadedArchive:
    sha256: str
    root: Path  # the extracted directory (in the cache)
    pipeline: PipelineFile

    def model_path(self, model_file: str) -> Path:
        return self.root / model_file


# Why a URL may not be fetched (None: it may): checked before the download and again
# for every redirect, so an allowed server cannot send the loader elsewhere.
UrlCheck = Callable[[str], "str | None"]


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, check: UrlCheck) -> None:
        self._check = check

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        reason = self._check(newurl)
        if reason is not None:
            raise ArchiveError(req.full_url, [f"redirect refused: {reason}"])
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(source: str, timeout_s: float, check: UrlCheck | None) -> object:
    if check is None:
        return urllib.request.urlopen(source, timeout=timeout_s)
    reason = check(source)
    if reason is not None:
        raise ArchiveError(source, [f"refused: {reason}"])
    opener = urllib.request.build_opener(_CheckedRedirects(check))
    return opener.open(source, timeout=timeout_s)


def _fetch(source: str, into: Path, limits: ArchiveLimits, check: UrlCheck | None = None) -> Path:
    """A local copy of the archive (URLs downloaded with a size cap; `check`: an URL
    policy applied to the URL and to each redirect, and local paths refused)."""
    if check is not None and not source.startswith(("http://", "https://")):
        raise ArchiveError(source, ["only http(s) URLs are fetched"])
    if not source.startswith(("http://", "https://")):
        path = Path(source.removeprefix("file://"))
        if not path.is_file():
            raise ArchiveError(source, ["no such archive file"])
        if path.stat().st_size > limits.max_archive_bytes:
            raise ArchiveError(source, [f"larger than {limits.max_archive_bytes} bytes"])
        return path
    target = into / "download.mpta"
    try:
        with (
            _open(source, limits.download_timeout_s, check) as response,  # type: ignore[attr-defined]
            target.open("wb") as out,
        ):
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_archive_bytes:
                raise ArchiveError(source, [f"larger than {limits.max_archive_bytes} bytes"])
            size, deadline = 0, time.monotonic() + limits.download_total_s
            # read1: what one socket read brings (a read of a full MiB would wait for all
            # of it, so a server dripping bytes would never meet the deadline check)
            while chunk := response.read1(1024 * 1024):
                if time.monotonic() > deadline:
                    raise ArchiveError(source, [f"download took over {limits.download_total_s:g}s"])
                size += len(chunk)
                if size > limits.max_archive_bytes:
                    raise ArchiveError(source, [f"larger than {limits.max_archive_bytes} bytes"])
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise ArchiveError(source, [f"download failed: HTTP {exc.code}"]) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ArchiveError(source, [f"download failed: {exc}"]) from exc
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def member_problems(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> list[str]:
    """Everything wrong with an archive's member list, before anything is extracted."""
    problems = []
    if len(infos) > limits.max_members:
        problems.append(f"{len(infos)} members, more than {limits.max_members}")
    total = 0
    for info in infos:
        name = info.filename
        path = PurePosixPath(name)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)  # 0: no Unix type recorded (e.g. Python's writestr)
        if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
            problems.append(f"{name!r}: absolute or non-POSIX path")
        elif ".." in path.parts:
            problems.append(f"{name!r}: path traversal")
        if stat.S_ISLNK(mode):
            problems.append(f"{name!r}: symbolic links are not allowed")
        elif kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            problems.append(f"{name!r}: not a regular file")
        if info.flag_bits & 0x1:
            problems.append(f"{name!r}: encrypted members are not supported")
        total += info.file_size
        if (
            info.file_size > limits.max_ratio * max(info.compress_size, 1)
            and info.file_size > 1024**2
        ):
            problems.append(
                f"{name!r}: compression ratio {info.file_size / max(info.compress_size, 1):.0f}"
                f" above {limits.max_ratio:.0f} (zip bomb?)"
            )
    if total > limits.max_total_bytes:
        problems.append(f"declared size {total} bytes, more than {limits.max_total_bytes}")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        problems.append("duplicate member names")
    return problems


def read_pipeline(archive: zipfile.ZipFile, source: str) -> PipelineFile:
    try:
        # At most 1 MiB + 1 is decompressed, whatever the member's header claims.
        with archive.open(PIPELINE_JSON) as member:
            raw = member.read(1024**2 + 1)
    except KeyError:
        raise ArchiveError(source, [f"no {PIPELINE_JSON} at the top of the archive"]) from None
    return parse_pipeline(raw, source)


def parse_pipeline(raw: bytes, source: str) -> PipelineFile:
    """`pipeline.json`'s bytes, checked (size, JSON, schema); raises ArchiveError."""
    if len(raw) > 1024**2:
        raise ArchiveError(source, [f"{PIPELINE_JSON} larger than 1 MiB"])
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchiveError(source, [f"{PIPELINE_JSON} is not valid JSON: {exc}"]) from exc
    try:
        return PipelineFile.model_validate(data)
    except ValidationError as exc:
        raise ArchiveError(source, validation_problems(exc)) from exc


def inspect_archive(path: Path, limits: ArchiveLimits, source: str | None = None) -> PipelineFile:
    """Check an archive completely without extracting it; raises ArchiveError."""
    source = source or str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            problems = member_problems(infos, limits)
            if problems:
                raise ArchiveError(source, problems)
            pipeline = read_pipeline(archive, source)
            # .pt files are pickles: check what they would do before anyone loads them.
            unsafe = [
                p
                for info in infos
                if info.filename.lower().endswith(".pt")
                for p in pt_bytes_problems(archive.read(info), info.filename)
            ]
            if unsafe:
                raise ArchiveError(source, unsafe)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(source, [f"not a zip archive: {exc}"]) from exc
    names = {i.filename for i in infos}
    missing = [
        f"{n.modelId}: modelFile {n.modelFile!r} is not in the archive"
        for n in pipeline.pipeline.walk()
        if n.modelFile is not None and n.modelFile not in names
    ]
    if missing:
        raise ArchiveError(source, missing)
    return pipeline


def _extract(path: Path, target: Path, limits: ArchiveLimits, source: str) -> None:
    """Extract member by member, counting the bytes really written (a lying header
    cannot make more than the limits land on disk)."""
    written = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            out = target / PurePosixPath(info.filename)
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            member_written = 0
            with archive.open(info) as src, out.open("wb") as dst:
                while chunk := src.read(1024 * 1024):
                    member_written += len(chunk)
                    written += len(chunk)
                    if member_written > info.file_size or written > limits.max_total_bytes:
                        raise ArchiveError(source, [f"{info.filename!r}: more data than declared"])
                    dst.write(chunk)


@contextmanager
def _node_lock(cache_dir: Path, digest: str) -> Iterator[None]:
    """One extraction of an archive at a time on this node: replicas (processes) that
    load the same archive at once must not replace each other's directory."""
    locks = cache_dir / ".locks"
    locks.mkdir(exist_ok=True)
    with (locks / digest).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_archive(
    source: str | Path, cache_dir: Path, limits: ArchiveLimits, check: UrlCheck | None = None
) -> LoadedArchive:
    """Validate and extract an archive into `cache_dir/<sha256>/` (reused when present).
    `check`: the URL policy of an archive a client named (see `_fetch`)."""
    source = str(source)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".incoming-") as tmp:
        local = _fetch(source, Path(tmp), limits, check)
        digest = sha256_of(local)
        final = cache_dir / digest
        pipeline = inspect_archive(local, limits, source)
        with _node_lock(cache_dir, digest):
            if not (final / PIPELINE_JSON).is_file():
                staging = Path(tmp) / "extract"
                staging.mkdir()
                _extract(local, staging, limits, source)
                # .pt files are pickles: check what they would import before anyone
                # loads them.
                unsafe = [
                    p
                    for pt in sorted(staging.rglob("*.pt"))
                    for p in pt_problems(pt, str(pt.relative_to(staging)))
                ]
                if unsafe:
                    raise ArchiveError(source, unsafe)
                if final.exists():  # a partial leftover from a crash: replace it
                    shutil.rmtree(final)
                staging.rename(final)
    return LoadedArchive(digest, final, pipeline)


def cached_archive(cache_dir: Path, digest: str, source: str) -> LoadedArchive | None:
    """The archive with this sha256 when this node extracted it already (it passed
    every check then), else None: a replica skips the download."""
    if re.fullmatch(r"[0-9a-f]{64}", digest) is None:
        return None
    final = cache_dir / digest
    try:
        with _node_lock(cache_dir, digest):
            if not (final / PIPELINE_JSON).is_file():
                return None
            with (final / PIPELINE_JSON).open("rb") as f:
                pipeline = parse_pipeline(f.read(1024**2 + 1), source)
    except (OSError, ArchiveError):  # unreadable: fetched and checked again
        return None
    return LoadedArchive(digest, final, pipeline)


FIXED_TIME = (2026, 1, 1, 0, 0, 0)


def model_files(pipeline: PipelineFile) -> list[str]:
    """Every modelFile the pipeline names, root first."""
    return [n.modelFile for n in pipeline.pipeline.walk() if n.modelFile is not None]


def pack_archive(pipeline_json: Path, out: Path, models_dir: Path | None = None) -> Path:
    """Zip a validated pipeline.json and the model files it names (looked up in
    `models_dir`, default: beside the JSON) into an .mpta. Deterministic: fixed member
    order and timestamps, so the same inputs give the same bytes (and sha256)."""
    source = str(pipeline_json)
    try:
        data = json.loads(pipeline_json.read_text())
        pipeline = PipelineFile.model_validate(data)
    except json.JSONDecodeError as exc:
        raise ArchiveError(source, [f"not valid JSON: {exc}"]) from exc
    except ValidationError as exc:
        raise ArchiveError(source, validation_problems(exc)) from exc
    models_dir = models_dir or pipeline_json.parent
    names = model_files(pipeline)
    missing = [n for n in names if not (models_dir / n).is_file()]
    if missing:
        raise ArchiveError(source, [f"model file {n!r} not found in {models_dir}" for n in missing])
    tmp = out.with_suffix(out.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        entries = [(PIPELINE_JSON, json.dumps(data, indent=2).encode())]
        entries += [(n, (models_dir / n).read_bytes()) for n in dict.fromkeys(names)]
        for name, payload in entries:
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, payload)
    tmp.replace(out)  # atomic: a reader never sees half an archive
    return out
