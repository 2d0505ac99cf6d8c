"""Camera and sink credentials never reach a status, an error text or a log line: the
one redaction (graph.common.redaction) behind its two old names, SourceError, and a
real source and reader against a dead camera whose URL holds credentials."""

from __future__ import annotations

import logging
import pickle
import random
import socket
import string
import time
from collections.abc import Callable
from urllib.parse import quote, unquote

import pytest

from deployments.delivery.service import redact_dsn
from deployments.jobs.records import redact_url
from stream_actors.reader import ReaderPolicy, StreamReader
from stream_actors.sources import (
    PyAVSource,
    SnapshotSource,
    SourceConnectionError,
    SourceError,
    SourceReadError,
)
from stream_actors.subscriptions import StreamSpec


def shared_redact(value: str) -> str:
    from graph.common.redaction import redact  # imported here: one test per name fails alone

    return redact(value)


REDACTORS: dict[str, Callable[[str], str]] = {
    "redaction.redact": shared_redact,
    "media_jobs.redact_url": redact_url,
    "action_service.redact_dsn": redact_dsn,
}

# (input, expected output, the secrets that must not survive)
FORMS = [
    ("rtsp://admin:p@ss@cam:554/stream", "rtsp://admin:***@cam:554/stream", ["p@ss"]),
    ("rtsp://admin:s3cret@10.0.0.7:554/s1", "rtsp://admin:***@10.0.0.7:554/s1", ["s3cret"]),
    (
        "http://cam/snapshot.cgi?user=admin&pwd=s3cr3t",
        "http://cam/snapshot.cgi?user=admin&pwd=***",
        ["s3cr3t"],
    ),
    ("http://cam/snap.jpg?token=abc123&size=2", "http://cam/snap.jpg?token=***&size=2", ["abc123"]),
    (
        "http://cam/a.cgi?Password=pw1234&apiKey=k3y99&X-Amz-Signature=d34db33f&ch=1",
        "http://cam/a.cgi?Password=***&apiKey=***&X-Amz-Signature=***&ch=1",
        ["pw1234", "k3y99", "d34db33f"],
    ),
    ("http://h/cb#access_token=abc123&state=1", "http://h/cb#access_token=***&state=1", ["abc123"]),
    ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0", ["s3cret"]),
    ("rediss://default:p4ssw@h", "rediss://default:***@h", ["p4ssw"]),
    ("postgresql://u:s3cret@h/db", "postgresql://u:***@h/db", ["s3cret"]),
    ("host=h password=s3cret dbname=x", "host=h password=*** dbname=x", ["s3cret"]),
    ("host=h password='a s3cret' dbname=x", "host=h password=*** dbname=x", ["s3cret"]),
    ("host=h password = 'it\\'s' dbname=x", "host=h password = *** dbname=x", ["it\\'s", "s'"]),
    # percent-encoded: neither the encoded nor the decoded password survives
    ("rtsp://admin:p%40ss%3Aw0rd@cam/x", "rtsp://admin:***@cam/x", ["p%40ss", "p@ss:w0rd"]),
    ("http://cam/s.jpg?pwd=s%26cr%3Dt&ch=1", "http://cam/s.jpg?pwd=***&ch=1", ["s&cr=t", "s%26cr"]),
    # raw '/', '?' or '#' in a password: the authority ends early, the password is kept out
    ("rtsp://admin:pa/ss@cam:554/stream", "rtsp://admin:***@cam:554/stream", ["pa/ss", "ss@"]),
    ("rtsp://admin:pa?ss@cam:554/stream", "rtsp://admin:***@cam:554/stream", ["pa?ss", "ss@"]),
    ("rtsp://admin:12/ss@cam:554/stream", "rtsp://admin:***@cam:554/stream", ["12/ss"]),
    # a URL with credentials inside a parameter
    ("http://h/go?next=rtsp%3A%2F%2Fu%3As3cret%40x%2F&a=1", "http://h/go?next=***&a=1", ["s3cret"]),
]


@pytest.mark.parametrize("name", REDACTORS)
@pytest.mark.parametrize(("raw", "expected", "secrets"), FORMS)
def test_every_form_of_secret_is_masked_by_every_name(
    name: str, raw: str, expected: str, secrets: list[str]
) -> None:
    shown = REDACTORS[name](raw)
    assert shown == expected
    for secret in secrets:
        assert secret not in shown and secret not in unquote(shown)


@pytest.mark.parametrize("name", REDACTORS)
@pytest.mark.parametrize(
    "value",
    [
        "rtsp://10.0.0.7/s1",
        "rtsp://admin@cam:554/s1",  # a user alone is no secret
        "rtsp://[::1]:8554/cam",
        "http://cam/x.cgi?user=admin&ch=1&keyframe=1",
        "http://cam/users/me@example.com/x.jpg",
        "https://cam/x.jpg?contact=me@example.com",
        "/data/clips/cam 1.mp4",
        "file:///data/clips/a.mp4",
        "host=h port=5432 dbname=x user=u",
        "",
    ],
)
def test_what_is_no_secret_is_shown_as_it_was(name: str, value: str) -> None:
    assert REDACTORS[name](value) == value


@pytest.mark.parametrize(
    "value",
    [
        "http://[::1",
        "://",
        "@@@:::///???###",
        "rtsp://a:b@[",
        "rtsp://:@",
        "host=h password='unterminated",
        "\x00\ud800é%zz%",
        "rtsp://" + "a:" * 5000 + "@h",
        "x" * 100_000,
    ],
)
def test_garbage_never_raises_and_stays_a_string(value: str) -> None:
    from graph.common.redaction import redact, redact_text, secrets_in

    assert isinstance(redact(value), str)
    assert isinstance(redact_text(value, value), str)
    assert isinstance(secrets_in(value), list)


def test_random_passwords_never_survive() -> None:
    from graph.common.redaction import redact, redact_text

    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "@:%!$*+,;~-._"
    for _ in range(2000):
        pw = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 16)))
        enc = quote(pw, safe="")
        for url in (
            f"rtsp://admin:{pw}@cam:554/stream",
            f"rtsp://admin:{enc}@cam:554/stream",
            f"redis://:{pw}@host:6379/0",
            f"http://cam/snap.cgi?user=a&pwd={enc}",
        ):
            for out in (redact(url), redact_text(f"refused: '{url}'", url)):
                assert pw not in out and enc not in out, (url, out)


def test_secret_names() -> None:
    from graph.common.redaction import is_secret_name

    for name in (
        "pwd", "PASS", "password", "passwd", "token", "access_token", "auth", "key",
        "apikey", "api_key", "API-Key", "secret", "signature", "sig", "session",
        "sessionid", "credential", "credentials", "X-Amz-Security-Token", "accessKey",
    ):  # fmt: skip
        assert is_secret_name(name), name
    for name in ("user", "username", "ch", "channel", "size", "resolution", "keyframe"):
        assert not is_secret_name(name), name


def test_redact_text_masks_the_url_in_every_form_and_its_secret_alone() -> None:
    from graph.common.redaction import redact_text

    url = "rtsp://admin:p%40ss%3Aw0rd@cam:554/x?token=t0k3n"
    message = (
        f"opening '{url}' failed; decoded '{unquote(url)}'; nonnumeric port: 'p@ss:w0rd@cam'"
        " dsn host=db password=dbs3cret; token t0k3n"
    )
    out = redact_text(message, url)
    for secret in ("p%40ss", "p@ss", "w0rd", "t0k3n", "dbs3cret"):
        assert secret not in out
    assert "rtsp://admin:***@cam:554/x?token=***" in out


# ---- SourceError ----------------------------------------------------------------------------
SECRET_URLS = [
    ("rtsp://admin:p@ss@cam:554/stream", ["p@ss", "ss@cam"]),
    ("rtsp://admin:s3cret@127.0.0.1:9/x", ["s3cret"]),
    ("http://cam/snapshot.cgi?user=admin&pwd=s3cr3t", ["s3cr3t"]),
    ("http://cam/snap.jpg?token=abc123&size=2", ["abc123"]),
    ("rtsp://admin:p%40ss%3Aw0rd@cam/x", ["p%40ss", "p@ss", "w0rd"]),
]


def assert_clean(err: BaseException, secrets: list[str]) -> None:
    texts = [str(err), repr(err), *map(str, err.args), pickle.loads(pickle.dumps(err)).__str__()]
    texts += [str(v) for v in vars(err).values()]
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret, text)


@pytest.mark.parametrize(("url", "secrets"), SECRET_URLS)
def test_a_source_error_keeps_no_secret(url: str, secrets: list[str]) -> None:
    err = SourceConnectionError(url, "refused")
    assert_clean(err, secrets)
    assert "***" in str(err) and str(err).endswith(": refused")


@pytest.mark.parametrize(("url", "secrets"), SECRET_URLS)
def test_a_wrapped_library_message_quoting_the_url_keeps_no_secret(
    url: str, secrets: list[str]
) -> None:
    # As PyAV, OpenCV and urllib word theirs: the URL as given, decoded, or a piece of it.
    library = OSError(111, "Connection refused", url)
    messages = [
        f"{type(library).__name__}: {library}",
        f"HTTPUnauthorizedError: Server returned 401 Unauthorized: {unquote(url)!r}",
        f"InvalidURL: nonnumeric port: {url.split(':', 2)[-1]!r}",
    ]
    for message in messages:
        assert_clean(SourceReadError(url, message), secrets)


def test_a_file_path_error_still_names_the_file() -> None:
    err = SourceConnectionError("/data/missing.mp4", "[Errno 2] No such file: '/data/missing.mp4'")
    assert str(err) == "/data/missing.mp4: [Errno 2] No such file: '/data/missing.mp4'"


# ---- real sources against a dead camera --------------------------------------------------
@pytest.fixture()
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_urls(port: int) -> list[tuple[str, list[str]]]:
    return [
        (f"rtsp://admin:s3cret@127.0.0.1:{port}/x", ["s3cret"]),
        (f"rtsp://admin:p@ss%40w0rd@127.0.0.1:{port}/x", ["p@ss", "w0rd"]),
        (f"http://127.0.0.1:{port}/snap.cgi?user=a&pwd=s3cret", ["s3cret"]),
        (f"http://127.0.0.1:{port}/snap.jpg?token=abc123&size=2", ["abc123"]),
    ]


def test_pyav_source_on_a_dead_camera_raises_without_secrets(closed_port: int) -> None:
    for url, secrets in dead_urls(closed_port):
        with pytest.raises(SourceConnectionError) as info:
            next(PyAVSource(url, open_timeout_s=1, read_timeout_s=1).frames())
        assert_clean(info.value, secrets)
        assert f"127.0.0.1:{closed_port}" in str(info.value)  # still recognisable
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_snapshot_source_on_a_dead_camera_raises_without_secrets(closed_port: int) -> None:
    urls = [u for u in dead_urls(closed_port) if u[0].startswith("http")]
    urls += [
        (f"http://admin:s3cret@127.0.0.1:{closed_port}/snap.jpg", ["s3cret"]),
        ("http://admin:s3cret@127.0.0.1/snap.jpg", ["s3cret"]),  # urllib: InvalidURL
    ]
    for url, secrets in urls:
        with pytest.raises(SourceError) as info:
            SnapshotSource(url, timeout_s=1).grab()
        assert_clean(info.value, secrets)
        assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(("kind", "index"), [("rtsp", 0), ("rtsp", 1), ("snapshot", 2)])
def test_a_reader_on_a_dead_camera_reports_and_logs_no_secret(
    kind: str, index: int, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    url, secrets = dead_urls(closed_port)[index]
    spec = StreamSpec(key="k", kind=kind, url=url)  # type: ignore[arg-type]
    policy = ReaderPolicy(open_timeout_s=1, read_timeout_s=1, backoff_base_s=0.05)
    reader = StreamReader(spec, policy)
    with caplog.at_level(logging.DEBUG):
        reader.start()
        deadline = time.monotonic() + 10
        while reader.last_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        reader.stop()
        assert reader.join(5)
    status = repr(reader.status())
    assert reader.last_error is not None and "***" in reader.last_error
    logged = caplog.text + "".join(repr(r.args) + repr(r.exc_info) for r in caplog.records)
    for secret in secrets:
        assert secret not in status and secret not in logged
