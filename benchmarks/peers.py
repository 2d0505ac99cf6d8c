"""Real peers that the benchmark and the tests share: a free local port, and Debian's
GStreamer RTSP server (`scripts/rtsp_server.py`) as a child process. Part of the installed
package, so the `camgraph bench` CLI works outside a checkout's tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from graph.config import PROJECT_ROOT

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's Python has `gi`; the venv's has not


# Ports that a local Ray node binds by default whatever else is free: the dashboard
# agent's HTTP port (52365, inside Linux's ephemeral range, so the kernel can hand it out
# here), the dashboard, GCS and Ray Client ports, and Serve's HTTP and gRPC defaults. A
# port handed out here and bound by Ray a moment later fails `serve.start` or `ray.init`.
RAY_DEFAULT_PORTS = frozenset({6379, 8000, 8265, 9000, 10001, 52365})


_handed_out: set[int] = set()  # by this process: two callers never get the same port


def free_port() -> int:
    """A port that is free now, none of Ray's defaults (`RAY_DEFAULT_PORTS`), and not
    handed out before by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in RAY_DEFAULT_PORTS and port not in _handed_out:
            _handed_out.add(port)
            return port


class RtspServer:
    """`scripts/rtsp_server.py` as a child process: start, kill, restart, freeze."""

    def __init__(self, mounts: dict[str, Path], copies: int = 1, port: int | None = None):
        self.mounts, self.copies = mounts, copies
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None

    def url(self, mount: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{mount}"

    def start(self, timeout_s: float = 20.0) -> RtspServer:
        args = [SYSTEM_PYTHON, str(PROJECT_ROOT / "scripts" / "rtsp_server.py")]
        args += ["--port", str(self.port), "--copies", str(self.copies), "--threads", "16"]
        args += [f"{name}={path}" for name, path in self.mounts.items()]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("ready"):
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the RTSP server did not start on port {self.port}")

    def _drain(self) -> None:
        proc = self.proc
        if proc is not None and proc.stdout is not None:
            for _ in proc.stdout:
                pass

    def stop(self) -> None:
        """Kill the server (SIGKILL: a camera that loses power) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case it is frozen
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
