"""Pipelines loaded from a subscription's `modelUrl` (`graph.pipeline.catalog`): the
allow-list refuses every URL trick, the catalog keeps each URL's and each content's
state, shares content, caches errors for a while, and unloads idle pipelines (least
recently used first when `max_loaded` is reached), all on an injected clock."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from graph.common.redaction import redact
from graph.pipeline.catalog import (
    PipelineCatalog,
    PipelineInfo,
    PipelinesFull,
    PipelineState,
    PipelineUnavailable,
    UrlPipelineSettings,
    UrlRefused,
    public_id,
)

PREFIX = "https://cms.example/models/"
ALLOWED = (PREFIX,)
OFF = "loading pipelines from modelUrl is off (set pipelines.allowed_urls)"
NOT_UNDER = "not under any of pipelines.allowed_urls"
TRAVERSAL = (
    "the URL's path has '.', '..', an empty segment, ';' or an escape of something"
    " other than a letter, digit, '-', '_' or '~'"
)
NOT_HTTP = "only http(s) URLs with a host are fetched"
CREDENTIALS = "credentials in the URL are not accepted"

ENABLED, LOADING, CONVERTING, ERROR, DOWNLOADING = (
    PipelineState.ENABLED,
    PipelineState.LOADING,
    PipelineState.CONVERTING,
    PipelineState.ERROR,
    PipelineState.DOWNLOADING,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def url(name: str) -> str:
    return f"{PREFIX}{name}.mpta"


def info(name: str, branches: tuple[str, ...] = ()) -> PipelineInfo:
    key = hashlib.sha256(name.encode()).hexdigest()
    return PipelineInfo(key, f"det_{name}", "v1", 640, branches)


def catalog(
    clock: Clock,
    *,
    max_loaded: int = 8,
    idle_unload_s: float = 60.0,
    retry_after_error_s: float = 30.0,
    touch_interval_s: float = 5.0,
) -> PipelineCatalog:
    settings = UrlPipelineSettings(
        allowed_urls=ALLOWED,
        max_loaded=max_loaded,
        idle_unload_s=idle_unload_s,
        retry_after_error_s=retry_after_error_s,
        touch_interval_s=touch_interval_s,
    )
    return PipelineCatalog(settings, clock=clock)


def enable(cat: PipelineCatalog, u: str, i: PipelineInfo) -> None:
    """The catalog actor's whole load of `u`: begin, download, the replicas' report."""
    assert cat.begin(u) is None
    assert cat.downloaded(u, i) is True
    cat.report(i.key, ENABLED)
    assert cat.state_of(u) == (ENABLED, None, i)


# ---- settings and the allow-list ----------------------------------------------------


def test_errors_keep_their_fields_across_pickling() -> None:
    refused = pickle.loads(pickle.dumps(UrlRefused("https://x/", "nope")))
    assert (refused.url, refused.reason, str(refused)) == (
        "https://x/",
        "nope",
        "modelUrl refused: nope",
    )
    unavailable = pickle.loads(pickle.dumps(PipelineUnavailable("models failed")))
    assert (unavailable.message, str(unavailable)) == ("models failed", "models failed")


# ---- the catalog: one URL's load -------------------------------------------------


def test_begin_refuses_urls_off_the_allow_list_and_records_nothing() -> None:
    cat = catalog(Clock())
    with pytest.raises(UrlRefused) as exc:
        cat.begin("https://cms.example.evil.org/models/a.mpta")
    assert (exc.value.reason, str(exc.value)) == (NOT_UNDER, f"modelUrl refused: {NOT_UNDER}")
    assert cat.status() == {}
    off = PipelineCatalog(UrlPipelineSettings(), clock=Clock())
    with pytest.raises(UrlRefused, match="is off"):
        off.begin(url("a"))


def test_an_unknown_url_is_not_loaded() -> None:
    assert catalog(Clock()).state_of(url("a")) == (ERROR, "not loaded", None)


def test_a_pipeline_goes_through_the_seeds_states_then_is_served_from_the_catalog() -> None:
    clock, a = Clock(), info("a", ("cls_a",))
    cat = catalog(clock)
    assert cat.begin(url("a")) is None
    assert cat.state_of(url("a")) == (DOWNLOADING, None, None)
    assert cat.status() == {
        url("a"): {"id": public_id(url("a"), None), "state": "downloading", "error": None}
    }
    assert cat.downloaded(url("a"), a) is True
    assert cat.state_of(url("a")) == (LOADING, None, a)
    cat.report(a.key, CONVERTING)
    assert cat.state_of(url("a")) == (CONVERTING, None, a)
    cat.report(a.key, ENABLED)
    assert cat.state_of(url("a")) == (ENABLED, None, a)
    clock.now += 10
    assert cat.begin(url("a")) == a  # enabled: no load, the caller gets it at once
    assert cat.status()[url("a")]["idle_s"] == 0.0
    assert cat.source_of(a.key) == url("a")
    assert cat.retired == {}


def test_two_urls_with_the_same_content_share_one_pipeline() -> None:
    clock, a = Clock(), info("a")
    cat = catalog(clock, max_loaded=1)
    enable(cat, url("a"), a)
    clock.now += 1
    assert cat.begin(url("copy")) is None
    assert cat.downloaded(url("copy"), a) is False  # enabled already: nothing to load
    # The second URL is enabled too (its subscribe must not wait for a report that
    # never comes), and sharing took no second slot of max_loaded.
    assert cat.state_of(url("copy")) == (ENABLED, None, a)
    assert cat.begin(url("copy")) == a
    assert cat.source_of(a.key) == url("a")  # the first in order
    status = cat.status()
    assert sorted(status) == [url("a"), url("copy")]
    assert {s["sha256"] for s in status.values()} == {a.key}
    assert all(s["state"] == "enabled" for s in status.values())
    clock.now += 100
    assert cat.sweep() == [a.key]  # one content, unloaded once, both URLs forgotten
    assert cat.status() == {}


def test_a_url_sharing_content_that_is_still_loading_follows_its_reports() -> None:
    a = info("a")
    cat = catalog(Clock())
    assert cat.begin(url("a")) is None and cat.downloaded(url("a"), a) is True
    assert cat.begin(url("copy")) is None
    assert cat.downloaded(url("copy"), a) is True  # not enabled yet: load (or wait)
    assert cat.state_of(url("copy")) == (LOADING, None, a)
    cat.report(a.key, CONVERTING)
    assert cat.state_of(url("a"))[0] is CONVERTING and cat.state_of(url("copy"))[0] is CONVERTING
    cat.report(a.key, ENABLED)
    assert cat.state_of(url("a")) == cat.state_of(url("copy")) == (ENABLED, None, a)


def test_errors_are_cached_for_retry_after_error_s_then_retried() -> None:
    clock = Clock()
    cat = catalog(clock, retry_after_error_s=30)
    assert cat.begin(url("bad")) is None
    cat.failed(url("bad"), "download failed: HTTP 404")
    assert cat.state_of(url("bad")) == (ERROR, "download failed: HTTP 404", None)
    assert cat.status() == {
        url("bad"): {
            "id": public_id(url("bad"), None),
            "state": "error",
            "error": "download failed: HTTP 404",
        }
    }
    clock.now += 29.9
    with pytest.raises(PipelineUnavailable) as exc:
        cat.begin(url("bad"))
    assert str(exc.value) == "download failed: HTTP 404"
    clock.now += 0.1
    assert cat.begin(url("bad")) is None  # retried: downloading again
    assert cat.state_of(url("bad")) == (DOWNLOADING, None, None)


def test_with_no_retry_delay_a_failed_url_is_retried_at_once() -> None:
    cat = catalog(Clock(), retry_after_error_s=0)
    assert cat.begin(url("bad")) is None
    cat.failed(url("bad"), "boom")
    assert cat.begin(url("bad")) is None


def test_reported_converting_does_not_demote_an_enabled_pipeline_but_an_error_does() -> None:
    clock, a = Clock(), info("a")
    cat = catalog(clock)
    enable(cat, url("a"), a)
    cat.report(a.key, CONVERTING)  # another replica converting: still usable
    assert cat.state_of(url("a")) == (ENABLED, None, a)
    assert cat.begin(url("a")) == a
    cat.report(a.key, ERROR, "models failed to load: boom")
    assert cat.state_of(url("a")) == (ERROR, "models failed to load: boom", a)
    with pytest.raises(PipelineUnavailable, match=r"^models failed to load: boom$"):
        cat.begin(url("a"))
    clock.now += 30
    assert cat.begin(url("a")) is None  # retried after retry_after_error_s
    assert cat.downloaded(url("a"), a) is True  # the failed content is loaded afresh
    assert cat.state_of(url("a")) == (LOADING, None, a)


def test_reports_for_unknown_content_are_ignored() -> None:
    cat = catalog(Clock())
    cat.report(info("ghost").key, ENABLED)
    assert cat.status() == {} and cat.source_of(info("ghost").key) is None


def test_a_failed_url_leaves_shared_enabled_content_to_the_others() -> None:
    a, b = info("a"), info("b")
    cat = catalog(Clock())
    enable(cat, url("a"), a)
    assert cat.begin(url("copy")) is None and cat.downloaded(url("copy"), a) is False
    cat.failed(url("copy"), "later failure", a.key)
    assert cat.state_of(url("copy")) == (ERROR, "later failure", a)
    assert cat.state_of(url("a")) == (ENABLED, None, a)
    assert cat.begin(url("a")) == a
    # Content that was still loading is dropped with its URL.
    assert cat.begin(url("b")) is None and cat.downloaded(url("b"), b) is True
    cat.failed(url("b"), "models failed to load: x", b.key)
    assert cat.state_of(url("b")) == (ERROR, "models failed to load: x", None)
    cat.report(b.key, ENABLED)  # a late report for dropped content changes nothing
    assert cat.state_of(url("b")) == (ERROR, "models failed to load: x", None)


# ---- use and unloading -------------------------------------------------------------


def test_idle_pipelines_are_unloaded_after_idle_unload_s() -> None:
    clock, a = Clock(0.0), info("a")
    cat = catalog(clock, idle_unload_s=60)
    enable(cat, url("a"), a)
    clock.now = 59.9
    assert cat.sweep() == []
    clock.now = 30.0
    assert cat.begin(url("a")) == a  # used: idle time starts again
    clock.now = 89.9
    assert cat.sweep() == []
    assert cat.status()[url("a")]["idle_s"] == 59.9
    clock.now = 90.0
    assert cat.sweep() == [a.key]
    assert cat.retired == {a.key: 90.0}
    assert cat.state_of(url("a")) == (ERROR, "not loaded", None)  # the URL is forgotten
    assert cat.source_of(a.key) is None and cat.status() == {}
    assert cat.sweep() == []
    # Loading it again takes it off the retired list (replicas must keep it).
    assert cat.begin(url("a")) is None
    assert cat.downloaded(url("a"), a) is True
    assert cat.retired == {}


def test_pipelines_that_are_not_enabled_yet_are_never_unloaded() -> None:
    clock, a = Clock(0.0), info("a")
    cat = catalog(clock, idle_unload_s=60)
    assert cat.begin(url("a")) is None and cat.downloaded(url("a"), a) is True
    cat.report(a.key, CONVERTING)
    clock.now = 10_000
    assert cat.sweep() == []
    assert cat.state_of(url("a")) == (CONVERTING, None, a)


def test_a_long_load_is_not_unloaded_before_its_subscriber_can_touch_it() -> None:
    """A load slower than idle_unload_s (a .pt export on a busy box): its idle time
    starts when it is enabled, not when its download ended."""
    clock, a = Clock(0.0), info("a")
    cat = catalog(clock, idle_unload_s=60)
    assert cat.begin(url("a")) is None and cat.downloaded(url("a"), a) is True
    clock.now = 100.0  # the replicas took 100 s to load it
    cat.report(a.key, ENABLED)
    clock.now = 159.9
    assert cat.sweep() == []  # not idle yet: enabled at 100
    clock.now = 160.0
    assert cat.sweep() == [a.key]


def test_retired_keys_are_forgotten_after_a_day() -> None:
    clock, a = Clock(0.0), info("a")
    cat = catalog(clock, idle_unload_s=60)
    enable(cat, url("a"), a)
    clock.now = 90.0
    assert cat.sweep() == [a.key]
    clock.now = 90.0 + 24 * 3600
    cat.sweep()
    assert cat.retired == {a.key: 90.0}
    clock.now += 1
    cat.sweep()
    assert cat.retired == {}


def test_max_loaded_unloads_the_least_recently_used_unused_pipeline() -> None:
    clock, a, b, c = Clock(0.0), info("a"), info("b"), info("c")
    cat = catalog(clock, max_loaded=2, idle_unload_s=600, touch_interval_s=5)
    enable(cat, url("a"), a)
    clock.now = 1.0
    enable(cat, url("b"), b)  # loaded after a ...
    clock.now = 10.0
    assert cat.begin(url("a")) == a  # ... but a was used since
    clock.now = 30.0  # a unused 20 s, b 29 s: both past 3 touch intervals (15 s)
    assert cat.begin(url("c")) is None
    assert cat.downloaded(url("c"), c) is True
    assert cat.retired == {b.key: 30.0}
    assert cat.state_of(url("b")) == (ERROR, "not loaded", None)
    assert cat.state_of(url("a")) == (ENABLED, None, a)
    assert cat.state_of(url("c")) == (LOADING, None, c)
    assert sorted(cat.status()) == [url("a"), url("c")]


def test_max_loaded_refuses_a_new_pipeline_when_all_are_in_use() -> None:
    clock, a, b, c = Clock(0.0), info("a"), info("b"), info("c")
    cat = catalog(clock, max_loaded=2, touch_interval_s=5)
    enable(cat, url("a"), a)
    enable(cat, url("b"), b)
    clock.now = 19.0
    assert cat.touch({a.key: url("a")}) == []
    clock.now = 20.0
    assert cat.touch({b.key: url("b")}) == []
    clock.now = 33.9  # used 14.9 and 13.9 s ago: less than 3 touch intervals (15 s)
    assert cat.begin(url("c")) is None
    message = "2 pipelines are in use (pipelines.max_loaded 2): unsubscribe one or raise the limit"
    with pytest.raises(PipelineUnavailable) as exc:
        cat.downloaded(url("c"), c)
    assert str(exc.value) == message
    assert cat.state_of(url("c")) == (ERROR, message, None)
    assert cat.state_of(url("a"))[0] is ENABLED and cat.state_of(url("b"))[0] is ENABLED
    assert cat.retired == {}
    with pytest.raises(PipelineUnavailable, match="in use"):
        cat.begin(url("c"))  # the error is cached like any other
    clock.now = 65.0  # retry_after_error_s passed, a and b unused for 45 s
    assert cat.begin(url("c")) is None
    assert cat.downloaded(url("c"), c) is True
    assert list(cat.retired) == [a.key]  # one slot was needed: the older one went


def test_max_loaded_counts_pipelines_still_loading() -> None:
    clock, a, b = Clock(0.0), info("a"), info("b")
    cat = catalog(clock, max_loaded=1)
    assert cat.begin(url("a")) is None and cat.downloaded(url("a"), a) is True
    clock.now = 1000.0  # loading for long, but a loading pipeline is never unloaded
    assert cat.begin(url("b")) is None
    with pytest.raises(PipelineUnavailable, match=r"^1 pipelines are in use"):
        cat.downloaded(url("b"), b)
    assert cat.state_of(url("a")) == (LOADING, None, a)


def test_touch_keeps_pipelines_alive_and_names_the_keys_it_does_not_hold() -> None:
    clock, a, b = Clock(0.0), info("a"), info("b")
    cat = catalog(clock, idle_unload_s=60)
    enable(cat, url("a"), a)
    clock.now = 50.0
    unknown = info("unknown").key
    used = {
        a.key: url("a"),
        unknown: url("unknown"),  # a pipeline a restarted catalog forgot: re-learn it
        b.key: "https://evil.example/models/b.mpta",  # no longer allowed: not re-learnt
    }
    assert cat.touch(used) == [unknown]
    clock.now = 109.9
    assert cat.sweep() == []
    assert cat.status()[url("a")]["idle_s"] == 59.9
    clock.now = 110.0
    assert cat.sweep() == [a.key]
    # A retired key that is still in use is one the catalog no longer holds.
    assert cat.touch({a.key: url("a")}) == [a.key]
    assert cat.retired == {a.key: 110.0}


def test_touch_takes_a_key_off_the_retired_list_once_loaded_again() -> None:
    clock, a = Clock(0.0), info("a")
    cat = catalog(clock, idle_unload_s=60)
    enable(cat, url("a"), a)
    clock.now = 60.0
    assert cat.sweep() == [a.key]
    cat.retired[a.key] = 60.0  # as if another URL re-learnt it while replicas drop it
    enable(cat, url("a"), a)
    assert cat.retired == {}
    cat.retired[a.key] = 61.0
    assert cat.touch({a.key: url("a")}) == []
    assert cat.retired == {}


def test_source_of_names_a_url_of_the_content() -> None:
    a, c = info("a"), info("c")
    cat = catalog(Clock(), max_loaded=1)
    enable(cat, url("z"), a)
    assert cat.begin(url("b")) is None and cat.downloaded(url("b"), a) is False
    assert cat.source_of(a.key) == url("b")  # sorted: the same URL every time
    assert cat.begin(url("c")) is None
    with pytest.raises(PipelineUnavailable):
        cat.downloaded(url("c"), c)
    assert cat.source_of(c.key) == url("c")  # known by its URL only
    assert cat.source_of(info("nothing").key) is None


def test_status_shows_redacted_urls_states_and_errors() -> None:
    clock, a = Clock(0.0), info("a")
    cat = catalog(clock)
    secret = f"{PREFIX}a.mpta?token=hunter2&v=1"
    enable(cat, secret, a)
    assert cat.begin(url("bad")) is None
    cat.failed(url("bad"), "download failed: HTTP 404")
    assert cat.begin(url("slow")) is None
    clock.now = 2.54
    assert cat.status(redact) == {
        f"{PREFIX}a.mpta?token=***&v=1": {
            "id": a.key[:12],
            "state": "enabled",
            "error": None,
            "sha256": a.key,
            "modelId": "det_a",
            "version": "v1",
            "idle_s": 2.5,
        },
        url("bad"): {
            "id": public_id(url("bad"), None),
            "state": "error",
            "error": "download failed: HTTP 404",
        },
        url("slow"): {"id": public_id(url("slow"), None), "state": "downloading", "error": None},
    }
    assert "hunter2" not in repr(cat.status(redact))
    assert secret in cat.status()  # without redact, the URL as given
    # The open /health's view: no URL at all, each pipeline by its content's id.
    public = cat.public_status()
    assert public == {
        a.key[:12]: {"state": "enabled", "error": None, "modelId": "det_a", "version": "v1"},
        public_id(url("bad"), None): {"state": "error", "error": "download failed: HTTP 404"},
        public_id(url("slow"), None): {"state": "downloading", "error": None},
    }
    assert "cms.example" not in repr(public) and public_id(url("bad"), None).startswith("url-")


def test_the_download_count_is_bounded_before_any_download() -> None:
    cat = catalog(Clock(), max_loaded=2)
    assert cat.begin(url("a")) is None and cat.begin(url("b")) is None
    with pytest.raises(PipelinesFull, match="2 pipelines are downloading"):
        cat.begin(url("c"))
    cat.failed(url("a"), "download failed: HTTP 404")
    assert cat.begin(url("c")) is None  # a download ended: room again


def test_a_url_the_allow_list_no_longer_allows_is_unloaded_at_the_next_sweep() -> None:
    clock, a, b = Clock(0.0), info("a"), info("b")
    cat = catalog(clock)
    enable(cat, url("a"), a)
    other = "https://other.example/m/b.mpta"
    cat.settings = UrlPipelineSettings(allowed_urls=(PREFIX, "https://other.example/m/"))
    enable(cat, other, b)
    cat.settings = UrlPipelineSettings(allowed_urls=(PREFIX,))  # a redeploy removed it
    assert cat.sweep() == []
    assert cat.retired == {b.key: 0.0} and not cat.holds(b.key) and cat.holds(a.key)
    assert other not in cat.status() and cat.touch({b.key: other}) == []  # not re-learnt


def test_failed_urls_are_forgotten_after_an_hour() -> None:
    clock = Clock()
    catalog = PipelineCatalog(UrlPipelineSettings(allowed_urls=("https://cms/m/",)), clock)
    for n in range(3):
        url = f"https://cms/m/{n}.mpta"
        assert catalog.begin(url) is None
        catalog.failed(url, "download failed: HTTP 404")
    clock.now += 3599.0
    catalog.sweep()
    assert len(catalog.status()) == 3
    clock.now += 1.0
    catalog.sweep()
    assert catalog.status() == {}
