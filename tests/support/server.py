"""Start an HTTP server as a subprocess on a free 127.0.0.1 port and wait until it answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command run in the background; `start()` returns its base URL once
    `ready_path` answers 200, and `stop()` (or leaving the `with` block) ends it."""

    def __init__(self, argv: list[str], port: int, ready_path: str = "/health",
                 env: dict[str, str] | None = None) -> None:
        self.argv, self.port, self.ready_path = argv, port, ready_path
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def start(self, timeout: float = 300.0) -> str:
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self) -> ServerProcess:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def llamaherd_server(model: str | None = None, *options: str, port: int | None = None,
                     threads: int | None = None) -> ServerProcess:
    """`llamaherd serve` with the current interpreter (options as on the command line)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "llamaherd.cli", "serve"]
    if model is not None:
        argv.append(model)
    argv += ["--host", "127.0.0.1", "--port", str(port), *options]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return ServerProcess(argv, port)
