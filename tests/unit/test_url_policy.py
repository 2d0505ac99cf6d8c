"""Which `modelUrl`s may be fetched (`graph.pipeline.catalog`'s allow-list): prefixes
normalised, every URL trick refused (host suffixes, userinfo, traversal in all its
spellings, other ports), and the denied networks still applied to allowed URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from graph.common.netpolicy import REFUSED
from graph.pipeline.catalog import (
    UrlPipelineSettings,
    UrlPipelinesSpec,
    normalise_prefix,
    url_refusal,
)
from stream_actors.subscriptions import Subscription, url_pipeline
from tests.unit.test_catalog import (
    ALLOWED,
    CREDENTIALS,
    NOT_HTTP,
    NOT_UNDER,
    OFF,
    PREFIX,
    TRAVERSAL,
    url,
)


def test_settings_are_off_by_default_with_the_documented_defaults() -> None:
    settings = UrlPipelineSettings()
    assert settings.enabled is False and settings.allowed_urls == ()
    assert (settings.idle_unload_s, settings.max_loaded, settings.load_timeout_s) == (600, 8, 300)
    assert (settings.retry_after_error_s, settings.touch_interval_s) == (30, 5)
    assert settings.intra_op_threads == 1
    assert UrlPipelineSettings(allowed_urls=ALLOWED).enabled is True
    with pytest.raises(ValidationError):
        UrlPipelineSettings(idle_unload_s=1)  # below 5 s
    with pytest.raises(ValidationError):
        UrlPipelineSettings(max_loaded=0)
    with pytest.raises(ValidationError):
        UrlPipelineSettings(bogus=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "prefix, normalised",
    [
        ("https://cms.example", "https://cms.example/"),  # a bare host gets '/'
        ("https://cms.example/", "https://cms.example/"),
        ("HTTPS://CMS.Example/Models/", "https://cms.example/Models/"),  # path case kept
        ("  http://H:8080/a/b/ ", "http://h:8080/a/b/"),
        ("http://127.0.0.1:9000/m/", "http://127.0.0.1:9000/m/"),
    ],
)
def test_allow_list_prefixes_are_normalised(prefix: str, normalised: str) -> None:
    assert normalise_prefix(prefix) == normalised
    assert UrlPipelineSettings(allowed_urls=(prefix,)).allowed_urls == (normalised,)


@pytest.mark.parametrize(
    "prefix, message",
    [
        ("https://cms.example/models", "must end with '/'"),
        ("https://cms.example/models/a.mpta", "must end with '/'"),
        ("ftp://cms.example/", "not an http(s) URL prefix"),
        ("file:///srv/models/", "not an http(s) URL prefix"),
        ("cms.example/models/", "not an http(s) URL prefix"),
        ("https:///models/", "not an http(s) URL prefix"),
        ("https://user:pw@cms.example/", "must not hold credentials"),
        ("https://user@cms.example/", "must not hold credentials"),
        ("https://cms.example/?x=1", "must not hold credentials, query"),
        ("https://cms.example/#frag", "must not hold credentials, query or fragment"),
    ],
)
def test_allow_list_prefixes_with_no_folder_or_with_secrets_are_refused(
    prefix: str, message: str
) -> None:
    with pytest.raises(ValueError, match="allowed_urls") as exc:
        normalise_prefix(prefix)
    assert message in str(exc.value)
    with pytest.raises(ValidationError) as invalid:
        UrlPipelineSettings(allowed_urls=(PREFIX, prefix))
    assert message in str(invalid.value)


def test_url_refusal_refuses_everything_when_the_allow_list_is_empty() -> None:
    assert url_refusal(url("a"), ()) == OFF
    assert url_refusal("not a url", ()) == OFF


@pytest.mark.parametrize(
    "candidate",
    [
        url("a"),
        "https://cms.example/models/sub/dir/a.mpta",
        "https://CMS.EXAMPLE/models/a.mpta",  # host case does not matter
        "HTTPS://Cms.Example/models/a.mpta",
        "https://cms.example/models/a.mpta?sig=abc&exp=1",  # signed CMS URLs
        "https://cms.example/models/a..b.mpta",  # dots inside a name are no traversal
    ],
)
def test_url_refusal_accepts_urls_under_an_allowed_prefix(candidate: str) -> None:
    assert url_refusal(candidate, ALLOWED) is None


@pytest.mark.parametrize(
    "candidate, reason",
    [
        ("https://cms.example.evil.org/models/a.mpta", NOT_UNDER),  # host suffix
        ("https://cms.example@evil.org/models/a.mpta", CREDENTIALS),  # userinfo
        ("https://cms.example:x@evil.org/models/a.mpta", CREDENTIALS),
        ("https://user:pw@cms.example/models/a.mpta", CREDENTIALS),
        ("https://cms.example/models/../secrets/a.mpta", TRAVERSAL),
        ("https://cms.example/models/..", TRAVERSAL),
        ("https://cms.example/models/./a.mpta", TRAVERSAL),
        ("https://cms.example/models/%2e%2e/secrets/a.mpta", TRAVERSAL),
        ("https://cms.example/models/%2E%2E/secrets/a.mpta", TRAVERSAL),
        ("https://cms.example/models/.%2e/a.mpta", TRAVERSAL),
        ("https://cms.example/models/..%2fsecrets%2fa.mpta", TRAVERSAL),
        ("https://cms.example/models/a%2Fb.mpta", TRAVERSAL),
        ("https://cms.example/models/..%5csecrets.mpta", TRAVERSAL),
        ("https://cms.example/models/..\\secrets.mpta", TRAVERSAL),
        ("ftp://cms.example/models/a.mpta", NOT_HTTP),
        ("file:///cms.example/models/a.mpta", NOT_HTTP),
        ("gopher://cms.example/models/a.mpta", NOT_HTTP),
        ("https:///models/a.mpta", NOT_HTTP),
        ("/models/a.mpta", NOT_HTTP),
        ("http://cms.example/models/a.mpta", NOT_UNDER),  # scheme differs
        ("https://cms.example/modelsX/a.mpta", NOT_UNDER),  # prefix is a folder
        ("https://cms.example/models", NOT_UNDER),
        ("https://cms.example/Models/a.mpta", NOT_UNDER),  # path case matters
        ("https://cms.example:8443/models/a.mpta", NOT_UNDER),  # another port
        ("https://other.example/models/a.mpta", NOT_UNDER),
        ("https://cms.example:99999/models/a.mpta", "not a valid URL"),
        # what some servers read as '..' or decode twice (the review's bypasses)
        ("https://cms.example/models/..;/admin/x.mpta", TRAVERSAL),
        ("https://cms.example/models/%252e%252e/x.mpta", TRAVERSAL),
        ("https://cms.example/models//x.mpta", TRAVERSAL),
        ("https://cms.example/models/.hidden/x.mpta", TRAVERSAL),
        ("https://cms.example/models/x%00.mpta", TRAVERSAL),
        ("https://cms.example/models/a;jsessionid=1/x.mpta", TRAVERSAL),
        ("https://[::1/models/a.mpta", "not a valid URL"),
    ],
)
def test_url_refusal_refuses_url_tricks(candidate: str, reason: str) -> None:
    assert url_refusal(candidate, ALLOWED) == reason


def test_url_refusal_matches_ports_exactly() -> None:
    allowed = (normalise_prefix("http://h:8080/"),)
    assert url_refusal("http://h:8080/x", allowed) is None
    assert url_refusal("http://H:8080/x", allowed) is None
    assert url_refusal("http://h:8081/x", allowed) == NOT_UNDER
    assert url_refusal("http://h/x", allowed) == NOT_UNDER
    assert url_refusal("http://h:80800/x", allowed) == "not a valid URL"
    # A prefix without a port does not allow other ports of the same host.
    assert url_refusal("https://cms.example:443/models/a.mpta", ALLOWED) == NOT_UNDER


def test_url_refusal_matches_any_of_several_prefixes() -> None:
    allowed = tuple(normalise_prefix(p) for p in ("https://a.example/x/", "http://b.example"))
    assert url_refusal("https://a.example/x/p.mpta", allowed) is None
    assert url_refusal("http://b.example/anything/p.mpta", allowed) is None
    assert url_refusal("https://b.example/p.mpta", allowed) == NOT_UNDER
    assert url_refusal("https://a.example/y/p.mpta", allowed) == NOT_UNDER


def test_url_refusal_matches_ipv6_hosts() -> None:
    allowed = (normalise_prefix("http://[2001:DB8::1]:8080/m/"),)
    assert allowed == ("http://[2001:db8::1]:8080/m/",)
    assert url_refusal("http://[2001:db8::1]:8080/m/a.mpta", allowed) is None
    assert url_refusal("http://[2001:db8::2]:8080/m/a.mpta", allowed) == NOT_UNDER


def spec(tmp_path: Path, *allowed: str) -> UrlPipelinesSpec:
    return UrlPipelinesSpec(
        settings=UrlPipelineSettings(allowed_urls=allowed),
        archive_cache_dir=tmp_path / "archives",
        onnx_cache_dir=tmp_path / "onnx",
    )


def test_url_check_applies_the_allow_list_then_the_denied_networks(tmp_path: Path) -> None:
    check = spec(tmp_path, "http://169.254.169.254/", "http://127.0.0.1:8000/m/").url_check()
    # Cloud metadata is refused by policy even when an operator allowed it.
    assert check("http://169.254.169.254/latest/a.mpta") == REFUSED
    assert check("http://127.0.0.1:8000/m/a.mpta") is None
    assert check("http://127.0.0.1:8000/other/a.mpta") == NOT_UNDER
    assert check("http://169.254.169.254@127.0.0.1:8000/m/a.mpta") == CREDENTIALS
    assert spec(tmp_path).url_check()("http://127.0.0.1:8000/m/a.mpta") == OFF


def test_url_check_refuses_ipv6_metadata_addresses_even_when_allowed(tmp_path: Path) -> None:
    check = spec(tmp_path, "http://[fd00:ec2::254]/").url_check()
    assert check("http://[fd00:ec2::254]/latest/a.mpta") == REFUSED


def test_a_subscription_runs_its_model_url_only_when_its_model_id_is_not_served() -> None:
    base = {"subscriptionIdentifier": "d;c", "rtspUrl": "rtsp://10.0.0.1/s"}
    url = "https://cms.example/models/car.mpta"
    seed = Subscription.model_validate({**base, "modelId": 101, "modelUrl": url})
    served = Subscription.model_validate({**base, "modelId": "demo", "modelUrl": url})
    bare = Subscription.model_validate({**base, "modelUrl": url})
    plain = Subscription.model_validate({**base, "modelId": 101})
    assert url_pipeline(seed, {"demo"}, enabled=True) == url
    assert url_pipeline(bare, {"demo"}, enabled=True) == url
    assert url_pipeline(served, {"demo"}, enabled=True) is None  # a served modelId wins
    assert url_pipeline(plain, {"demo"}, enabled=True) is None
    assert url_pipeline(seed, {"demo"}, enabled=False) is None  # modelUrl is off
