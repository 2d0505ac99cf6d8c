"""Outbound fetches (snapshot cameras, media URLs) never reach denied networks, not even
through a redirect (no Ray; nothing is sent to a denied address: refused before)."""

from __future__ import annotations

import asyncio
import http.server
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.jobs.media import download
from deployments.jobs.records import MediaError
from graph.common.netpolicy import REFUSED, denied, networks
from stream_actors.reader import ReaderPolicy
from stream_actors.sources import SnapshotSource, SourceConnectionError, SourceReadError
from tests.peers import http_server

METADATA = "http://169.254.169.254/latest/meta-data/"


class _Redirector(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/data":
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"payload")
            return
        self.send_response(302)  # /allowed: to /data on this host; else: cloud metadata
        self.send_header("Location", "/data" if self.path == "/allowed" else METADATA)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def redirector() -> Iterator[str]:
    with http_server(_Redirector) as base:
        yield f"{base}/snap.jpg"


def test_link_local_is_denied_by_default_and_private_ranges_on_request() -> None:
    default = networks(ReaderPolicy().denied_networks)
    assert denied(METADATA, default) == REFUSED
    assert denied("http://[fe80::1]/x", default) == REFUSED
    assert denied("http://127.0.0.1:8080/snap.jpg", default) is None
    assert denied("http://127.0.0.1/x", networks(["127.0.0.0/8"])) == REFUSED
    assert denied("http://[::ffff:127.0.0.1]/x", networks(["127.0.0.0/8"])) == REFUSED
    assert denied("http://no-such-host.invalid/x", default) is None  # fails on its own
    with pytest.raises(ValueError):
        ReaderPolicy(denied_networks=("not-a-network",))


def test_a_snapshot_camera_in_a_denied_network_is_refused_before_any_request() -> None:
    with pytest.raises(SourceConnectionError) as refused:
        SnapshotSource(METADATA).grab()
    assert str(refused.value).endswith(REFUSED)
    assert "169.254" not in refused.value.reason  # nothing to map a network with


def test_a_redirect_into_a_denied_network_is_refused(redirector: str, tmp_path: Path) -> None:
    with pytest.raises(SourceReadError, match="HTTP 302"):
        SnapshotSource(redirector).grab()
    with pytest.raises(MediaError, match="refused by policy: redirect"):
        asyncio.run(download(redirector, tmp_path, 1024, 10.0))
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left


def test_a_redirect_to_an_allowed_host_is_followed(redirector: str, tmp_path: Path) -> None:
    allowed = redirector.replace("/snap.jpg", "/allowed")
    path = asyncio.run(download(allowed, tmp_path, 1024, 10.0))
    assert path.read_bytes() == b"payload"


def test_addresses_that_carry_a_denied_ipv4_address_are_denied_too() -> None:
    loopback = networks(["127.0.0.0/8", "::1/128"])
    for url in (
        "http://[64:ff9b::7f00:1]/x",  # NAT64 of 127.0.0.1
        "http://[2002:7f00:1::]/x",  # 6to4 of 127.0.0.1
        "http://0.0.0.0:8080/x",  # connects to this host
        "http://[::]:8080/x",
    ):
        assert denied(url, loopback) == REFUSED, url
    assert denied("http://[fd00:ec2::254]/", networks(ReaderPolicy().denied_networks))


def test_an_rtsp_camera_in_a_denied_network_is_refused_before_any_packet() -> None:
    from stream_actors.reader import open_source
    from stream_actors.subscriptions import StreamSpec

    spec = StreamSpec(key="rtsp-x", kind="rtsp", url="rtsp://169.254.169.254:554/live")
    with pytest.raises(SourceConnectionError, match="refused by policy"):
        open_source(spec, ReaderPolicy())
