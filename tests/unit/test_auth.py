"""Bearer-token authentication (deployments.api.auth) and its settings, without Ray."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.api.auth import AuthConfigError, bearer, load_token, token_ok
from graph.common.schemas import IngressSettings

ENV = "CAMGRAPH_TEST_TOKEN"


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc123", "abc123"),
        ("bearer abc123", "abc123"),
        ("BEARER abc123", "abc123"),
        ("BeArEr abc123", "abc123"),
        ("Bearer    abc123   ", "abc123"),
        ("   Bearer abc123", "abc123"),
        ("Basic abc123", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Token abc123", None),
        ("Bearer", None),
        ("Bearer    ", None),
        ("abc123", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_bearer_takes_the_token_of_a_bearer_header_only(
    header: str | None, token: str | None
) -> None:
    assert bearer(header) == token


def test_token_ok() -> None:
    assert token_ok(None, None) is True  # auth off: anything goes
    assert token_ok("whatever", None) is True
    assert token_ok(None, "s3cret") is False  # missing
    assert token_ok("", "s3cret") is False
    assert token_ok("wrong", "s3cret") is False
    assert token_ok("s3cret ", "s3cret") is False  # exact, no trimming here
    assert token_ok("S3CRET", "s3cret") is False
    assert token_ok("s3cret", "s3cret") is True
    assert token_ok("tök€n", "tök€n") is True  # non-ASCII compares as UTF-8


def test_no_source_means_auth_off() -> None:
    assert load_token(None, None) is None


def test_load_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "  from-env\n")
    assert load_token(ENV, None) == "from-env"


@pytest.mark.parametrize("value", [None, "", "  \n"])
def test_a_configured_env_that_is_unset_or_empty_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    with pytest.raises(AuthConfigError, match=rf"auth_token_env: \${ENV} is unset or empty"):
        load_token(ENV, None)


def test_load_token_from_a_file_strips_the_newline(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("from-file\n")
    assert load_token(None, file) == "from-file"


def test_a_configured_file_that_is_missing_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(AuthConfigError, match=r"auth_token_file .*nope: No such file"):
        load_token(None, missing)


def test_a_configured_directory_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="auth_token_file"):
        load_token(None, tmp_path)


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
def test_a_configured_file_that_is_empty_refuses_to_start(tmp_path: Path, content: str) -> None:
    file = tmp_path / "token"
    file.write_text(content)
    with pytest.raises(AuthConfigError, match="is empty"):
        load_token(None, file)


def test_auth_config_error_is_a_value_error() -> None:
    assert issubclass(AuthConfigError, ValueError)


def test_settings_take_one_token_source_at_most(tmp_path: Path) -> None:
    assert IngressSettings().auth_token_env is None and IngressSettings().auth_token_file is None
    assert IngressSettings(auth_token_env=ENV).auth_token_env == ENV
    assert IngressSettings(auth_token_file=tmp_path / "t").auth_token_file == tmp_path / "t"
    with pytest.raises(ValidationError, match="at most one of auth_token_env, auth_token_file"):
        IngressSettings(auth_token_env=ENV, auth_token_file=tmp_path / "t")


@pytest.mark.parametrize("name", ["1TOKEN", "MY-TOKEN", "$TOKEN", ""])
def test_settings_refuse_a_bad_env_name(name: str) -> None:
    with pytest.raises(ValidationError, match="auth_token_env"):
        IngressSettings(auth_token_env=name)
