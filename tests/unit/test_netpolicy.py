"""Outbound fetches (snapshot cameras, media URLs) never reach denied networks, not even
through a redirect (no Ray; nothing is sent to a denied address: refused before)."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.media_jobs import MediaError, download
from deployments.netpolicy import REFUSED, denied, networks
from stream_actors.reader import ReaderPolicy
from stream_actors.sources import SnapshotSource, SourceConnectionError, SourceReadError

METADATA = "http://169.254.169.254/latest/meta-data/"


class _Redirector(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", METADATA)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def redirector() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/snap.jpg"
    httpd.shutdown()
    httpd.server_close()


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
