"""Real peers for tests: an HTTP snapshot server and a TCP proxy that cuts or silences
connections; the RTSP server and `free_port` are the benchmark's (`benchmarks.peers`)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from benchmarks.peers import SYSTEM_PYTHON, RtspServer, free_port

__all__ = ["SYSTEM_PYTHON", "RtspServer", "SnapshotServer", "TcpProxy", "free_port"]


class SnapshotServer:
    """A real HTTP server on 127.0.0.1 serving files from a directory."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> SnapshotServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class TcpProxy:
    """A real TCP forwarder in front of a server (Redis, PostgreSQL). `cut()` refuses new
    connections and resets the open ones, as a server that went down; `restore()` opens
    the same port again. `silence()` forwards nothing more, on the open connections and
    on new ones, while keeping them open (a partition: no reset, no answer); `restore()`
    ends it for new connections."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._silenced: set[socket.socket] = set()
        self._silent = False
        self.restore()

    def restore(self) -> None:
        self._silent = False
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # idle pooled connections must stay open
            with self._lock:
                self._conns += [client, upstream]
                if self._silent:
                    self._silenced.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if src in self._silenced:
                    continue  # swallowed: the peer waits for an answer that never comes
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close alone does not
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # shutdown first: close() alone does not end a recv() blocked in another
                # thread, so the socket would stay open and the peer would never hear
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()  # linger 0: the peer sees a reset

    def silence(self) -> None:
        """Forward nothing more, on open and new connections (they stay open)."""
        with self._lock:
            self._silent = True
            self._silenced.update(self._conns)

    def close(self) -> None:
        self.cut()


@contextlib.contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 with `handler`, as its base URL, for a `with`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
