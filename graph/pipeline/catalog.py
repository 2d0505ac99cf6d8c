"""Pipelines a subscription names by `modelUrl`, loaded while the app runs (no Ray).

The seeds' subscribe carries `modelUrl`: the worker downloads that `.mpta` and runs it.
camgraph fetches it through the safe loader (size caps, pickle scan, schema, sha256
cache), serves its models through the multiplexed `PipelineDetector` and
`PipelineClassifier` deployments (keyed by the archive's sha256), and unloads it once no
subscription has used it for `idle_unload_s`. This module is the bookkeeping: which URLs
may be fetched, each pipeline's state (the seed's `downloading`, `converting`,
`enabled`, `error`, plus `loading` while an ONNX model loads), which are in use, which
to unload (idle ones, least recently used first when more than `max_loaded` are held).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from graph.common.errors import CamgraphError
from graph.common.netpolicy import DEFAULT_DENIED, denied, networks
from graph.common.schemas import StrictModel
from graph.pipeline.archive import ArchiveLimits, UrlCheck


class UrlPipelineSettings(StrictModel):
    """`pipelines.allowed_urls` and friends in serve_config.yaml. Off by default: with
    no allowed URL, a `modelUrl` is never fetched (a subscribe naming an unknown model
    gets an error), so no client can make the cluster download what it likes."""

    allowed_urls: tuple[str, ...] = Field(
        (), description="URL prefixes archives may come from (e.g. https://cms.example/models/)"
    )
    idle_unload_s: float = Field(600.0, ge=5, le=7 * 86400, description="unused: unloaded after")
    max_loaded: int = Field(8, ge=1, le=256, description="pipelines held at once")
    load_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="a subscribe waits this long for download and load"
    )
    retry_after_error_s: float = Field(
        30.0, ge=0, le=3600, description="a failed URL is fetched again only after this"
    )
    intra_op_threads: int = Field(1, ge=1, le=64, description="ORT threads per model")
    touch_interval_s: float = Field(
        5.0, gt=0, le=300, description="how often camera actors say what they use"
    )

    @field_validator("allowed_urls")
    @classmethod
    def _prefixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalise_prefix(v) for v in value)

    @model_validator(mode="after")
    def _touches_fit(self) -> UrlPipelineSettings:
        if self.idle_unload_s < 3 * self.touch_interval_s:
            raise ValueError(
                f"idle_unload_s ({self.idle_unload_s:g}) must be at least 3 touch intervals"
                f" ({3 * self.touch_interval_s:g} s): pipelines in use would be unloaded"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_urls)


class UrlPipelinesSpec(StrictModel):
    """What the catalog actor and the multiplexed deployments run with (paths absolute)."""

    settings: UrlPipelineSettings
    archive_cache_dir: Path
    onnx_cache_dir: Path
    trt_cache_dir: Path | None = None
    limits: ArchiveLimits = ArchiveLimits()
    use_connections: bool = False  # actions.archive_connections: use

    def url_check(self) -> UrlCheck:
        """The policy of every fetch (the URL and each redirect): the allow-list, then
        the networks no fetch may reach (cloud metadata)."""
        allowed, deny = self.settings.allowed_urls, networks(DEFAULT_DENIED)
        return lambda url: url_refusal(url, allowed) or denied(url, deny)


class UrlRefused(CamgraphError):
    """A `modelUrl` that is not on the allow-list (or is malformed)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url, self.reason = url, reason

    def __str__(self) -> str:
        return f"modelUrl refused: {self.reason}"


class PipelineUnavailable(CamgraphError):
    """A pipeline that failed to load (its text names the problem) or cannot be held."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PipelineLoading(PipelineUnavailable):
    """Not enabled yet (still downloading or loading): subscribe again later."""


class PipelinesFull(PipelineUnavailable):
    """`max_loaded` pipelines are in use: none can be unloaded for another."""


def normalise_prefix(prefix: str) -> str:
    """An allow-list entry: http(s), a host, a path ending in `/` (a bare host gets `/`,
    so `https://cms.example` can never match `https://cms.example.evil.org/`)."""
    parts = urlsplit(prefix.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"allowed_urls: {prefix!r} is not an http(s) URL prefix with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"allowed_urls: {prefix!r} must not hold credentials, query or fragment")
    path = parts.path or "/"
    if not path.endswith("/"):
        raise ValueError(f"allowed_urls: {prefix!r} must end with '/' (a folder, not a file)")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


_TRAVERSAL = re.compile(r"(^|/)\.\.?(/|$)|%2e|%2f|%5c|\\", re.IGNORECASE)
# A path segment: no empty one (`//`), none starting with '.', no ';' (path parameters,
# `..;/` on some servers), and escapes only of letters, digits, '-', '_', '~' (no `%25`:
# servers that decode twice; no `%00`).
_UNRESERVED_ESCAPE = r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[dD]|5[fF]|7[eE])"
_SEGMENT = re.compile(rf"^(?!\.)(?:[A-Za-z0-9._~!$&'()*+,=:@-]|{_UNRESERVED_ESCAPE})+$")


def _path_problem(path: str) -> bool:
    segments = path.split("/")[1:]
    return bool(_TRAVERSAL.search(path)) or any(not _SEGMENT.match(x) for x in segments)


def url_refusal(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why `url` may not be fetched, or None when it starts with an allowed prefix."""
    if not allowed:
        return "loading pipelines from modelUrl is off (set pipelines.allowed_urls)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a valid URL"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return "only http(s) URLs with a host are fetched"
    if parts.username or parts.password:
        return "credentials in the URL are not accepted"
    if _path_problem(parts.path):
        return (
            "the URL's path has '.', '..', an empty segment, ';' or an escape of something"
            " other than a letter, digit, '-', '_' or '~'"
        )
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host  # IPv6, bracketed as in the prefixes
    netloc = host + (f":{port}" if port is not None else "")
    plain = f"{parts.scheme.lower()}://{netloc}{parts.path}"
    if not any(plain.startswith(p) for p in allowed):
        return "not under any of pipelines.allowed_urls"
    return None


class PipelineState(StrEnum):
    DOWNLOADING = "downloading"
    LOADING = "loading"
    CONVERTING = "converting"
    ENABLED = "enabled"
    ERROR = "error"


@dataclass(frozen=True)
class PipelineInfo:
    """What camera actors need of a loaded pipeline archive."""

    key: str  # the archive's sha256: the multiplexed model id of its detector
    model_id: str  # the root's modelId
    version: str
    imgsz: int
    branches: tuple[str, ...]  # branch model ids (each a `<key>:<branch>` classifier)


@dataclass
class _Url:
    state: PipelineState
    key: str | None = None
    error: str | None = None
    at: float = 0.0


@dataclass
class _Loaded:
    info: PipelineInfo
    state: PipelineState
    loaded_at: float
    last_used: float
    error: str | None = None
    urls: set[str] = field(default_factory=set)


class PipelineCatalog:
    """The app's URL pipelines: state by URL and by content (sha256), use, unloading."""

    def __init__(
        self, settings: UrlPipelineSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings, self._clock = settings, clock
        self._urls: dict[str, _Url] = {}
        self._loaded: dict[str, _Loaded] = {}
        self.retired: dict[str, float] = {}  # key → when unloaded (replicas drop it)

    # ---- one URL's load ----------------------------------------------------------
    def begin(self, url: str) -> PipelineInfo | None:
        """Before a subscribe's load: raises UrlRefused, or PipelineUnavailable for a URL
        that failed within `retry_after_error_s`; returns the pipeline when it is already
        enabled (and marks it used), else None (the caller loads it)."""
        reason = url_refusal(url, self.settings.allowed_urls)
        if reason is not None:
            raise UrlRefused(url, reason)
        now = self._clock()
        entry = self._urls.get(url)
        if (
            entry is not None
            and entry.state is PipelineState.ERROR
            and now - entry.at < self.settings.retry_after_error_s
        ):
            raise PipelineUnavailable(entry.error or "failed")
        if entry is not None and entry.key is not None and entry.key in self._loaded:
            loaded = self._loaded[entry.key]
            if loaded.state is PipelineState.ENABLED:
                loaded.last_used = now
                return loaded.info
        # No more downloads at once than max_loaded (whether the content is one held
        # already is known only once downloaded: downloaded() checks the room then).
        if self._downloading() >= self.settings.max_loaded:
            raise PipelinesFull(
                f"{self._downloading()} pipelines are downloading (pipelines.max_loaded"
                f" {self.settings.max_loaded}): subscribe again later"
            )
        self._urls[url] = _Url(PipelineState.DOWNLOADING, at=now)
        return None

    def _downloading(self) -> int:
        return sum(e.state is PipelineState.DOWNLOADING for e in self._urls.values())

    def holds(self, key: str) -> bool:
        """Whether the content with this sha256 is loaded or loading here."""
        return key in self._loaded

    def downloaded(self, url: str, info: PipelineInfo) -> bool:
        """The archive at `url` is checked and extracted; returns True when its content
        still has to be loaded by the replicas (False: another URL loaded it already)."""
        now = self._clock()
        reason = url_refusal(url, self.settings.allowed_urls)
        if reason is not None:  # the allow-list changed while it downloaded
            self._urls.pop(url, None)
            raise UrlRefused(url, reason)
        self._urls[url] = _Url(PipelineState.LOADING, info.key, at=now)
        self.retired.pop(info.key, None)
        loaded = self._loaded.get(info.key)
        if loaded is not None and loaded.state is not PipelineState.ERROR:
            loaded.urls.add(url)
            loaded.last_used = now
            # This URL takes the content's state (enabled: no report will come for it).
            self._urls[url] = _Url(loaded.state, info.key, loaded.error, now)
            return loaded.state is not PipelineState.ENABLED
        held = [k for k, p in self._loaded.items() if p.state is not PipelineState.ERROR]
        if len(held) >= self.settings.max_loaded:
            self._unload_idle(now, need=len(held) - self.settings.max_loaded + 1)
            held = [k for k, p in self._loaded.items() if p.state is not PipelineState.ERROR]
            if len(held) >= self.settings.max_loaded:
                message = (
                    f"{len(held)} pipelines are in use (pipelines.max_loaded "
                    f"{self.settings.max_loaded}): unsubscribe one or raise the limit"
                )
                self.failed(url, message, key=info.key)
                raise PipelinesFull(message)
        self._loaded[info.key] = _Loaded(info, PipelineState.LOADING, now, now, urls={url})
        return True

    def report(self, key: str, state: PipelineState, error: str | None = None) -> None:
        """A replica's word on a pipeline's models (converting, enabled, error)."""
        loaded = self._loaded.get(key)
        if loaded is None:
            return
        if loaded.state is PipelineState.ENABLED and state is PipelineState.CONVERTING:
            return  # one more replica converting: the pipeline stays usable
        if state is PipelineState.ENABLED and loaded.state is not PipelineState.ENABLED:
            # Idle time counts from when it could first be used: a load that took
            # longer than idle_unload_s must not be unloaded before its subscriber
            # attaches and touches it.
            loaded.last_used = self._clock()
        loaded.state, loaded.error = state, error
        for url in loaded.urls:
            if url in self._urls:
                self._urls[url] = _Url(state, key, error, self._clock())

    def failed(self, url: str, error: str, key: str | None = None) -> None:
        self._urls[url] = _Url(PipelineState.ERROR, key, error, self._clock())
        if key is not None and key in self._loaded:
            loaded = self._loaded[key]
            loaded.urls.discard(url)
            if not loaded.urls or loaded.state is not PipelineState.ENABLED:
                del self._loaded[key]

    def state_of(self, url: str) -> tuple[PipelineState, str | None, PipelineInfo | None]:
        entry = self._urls.get(url)
        if entry is None:
            return PipelineState.ERROR, "not loaded", None
        loaded = self._loaded.get(entry.key) if entry.key else None
        return entry.state, entry.error, loaded.info if loaded else None

    # ---- use and unloading -------------------------------------------------------
    def touch(self, used: dict[str, str]) -> list[str]:
        """Camera actors' pipelines in use (key → URL). An unknown key (this catalog
        restarted) is learnt again when its URL is still allowed. Returns the keys it
        does not hold (the caller re-learns them with a load)."""
        now, unknown = self._clock(), []
        for key, url in used.items():
            loaded = self._loaded.get(key)
            if loaded is None:
                if url_refusal(url, self.settings.allowed_urls) is None:
                    unknown.append(key)
                continue
            loaded.last_used = now
            self.retired.pop(key, None)
        return unknown

    def source_of(self, key: str) -> str | None:
        """A URL the archive with this sha256 came from (replicas fetch it themselves)."""
        loaded = self._loaded.get(key)
        if loaded is not None and loaded.urls:
            return sorted(loaded.urls)[0]
        return next((u for u, e in self._urls.items() if e.key == key), None)

    def sweep(self) -> list[str]:
        """Unload pipelines unused for `idle_unload_s`; returns their keys. Failed URLs
        are forgotten once they may be retried and an hour has passed (a client naming
        ever new URLs cannot grow the catalog without bound)."""
        now = self._clock()
        self._revoke(now)
        keep_s = max(self.settings.retry_after_error_s, 3600.0)
        for url in [
            u
            for u, e in self._urls.items()
            if e.state is PipelineState.ERROR and now - e.at >= keep_s
        ]:
            del self._urls[url]
        return self._unload_idle(now, need=0)

    def _revoke(self, now: float) -> None:
        """URLs the allow-list no longer allows (a redeploy removed their prefix) are
        forgotten; content left with no allowed URL is unloaded (retired)."""
        allowed = self.settings.allowed_urls
        for url in [u for u in self._urls if url_refusal(u, allowed) is not None]:
            del self._urls[url]
        for key, loaded in list(self._loaded.items()):
            loaded.urls = {u for u in loaded.urls if url_refusal(u, allowed) is None}
            if not loaded.urls and loaded.state is PipelineState.ENABLED:
                del self._loaded[key]
                self.retired[key] = now

    def _unload_idle(self, now: float, need: int) -> list[str]:
        """Unload every pipeline idle past `idle_unload_s`, and then, least recently used
        first, `need` more among those unused for at least 3 touch intervals."""
        idle_s, recent_s = self.settings.idle_unload_s, 3 * self.settings.touch_interval_s
        held = sorted(
            (p.last_used, k) for k, p in self._loaded.items() if p.state is PipelineState.ENABLED
        )
        out: list[str] = []
        for last_used, key in held:
            unused = now - last_used
            if unused >= idle_s or (len(out) < need and unused >= recent_s):
                out.append(key)
        for key in out:
            loaded = self._loaded.pop(key)
            for url in loaded.urls:
                self._urls.pop(url, None)
            self.retired[key] = now
        cutoff = now - 24 * 3600  # replicas have long dropped these
        self.retired = {k: t for k, t in self.retired.items() if t >= cutoff}
        return out

    def status(self, redact: Callable[[str], str] = lambda u: u) -> dict[str, Any]:
        """`GET /pipelines` (behind the token): each URL's state, the error text, and the
        content."""
        now = self._clock()
        out: dict[str, Any] = {}
        for url, entry in sorted(self._urls.items()):
            loaded = self._loaded.get(entry.key) if entry.key else None
            item: dict[str, Any] = {"id": public_id(url, entry.key), "state": entry.state.value}
            item["error"] = entry.error
            if loaded is not None:
                item.update(
                    sha256=loaded.info.key,
                    modelId=loaded.info.model_id,
                    version=loaded.info.version,
                    idle_s=round(max(0.0, now - loaded.last_used), 1),
                )
            out[redact(url)] = item
        return out

    def public_status(self) -> dict[str, Any]:
        """The open `/health`'s `pipelines`: no URL (one may be a capability), each
        pipeline by its content's id (`sha256[:12]`; a URL that never loaded: `url-` and
        a digest of it) with its state, error text, modelId and version."""
        out: dict[str, Any] = {}
        for url, entry in sorted(self._urls.items()):
            loaded = self._loaded.get(entry.key) if entry.key else None
            item: dict[str, Any] = {"state": entry.state.value, "error": entry.error}
            if loaded is not None:
                item.update(modelId=loaded.info.model_id, version=loaded.info.version)
            out.setdefault(public_id(url, entry.key), item)
        return out


def public_id(url: str, key: str | None) -> str:
    """How the open /health names a pipeline: its content, else a digest of its URL."""
    if key is not None:
        return key[:12]
    return "url-" + hashlib.sha256(url.encode()).hexdigest()[:12]
