"""A small fault-injecting HTTP proxy between an MLflow client and a real ``mlflow server``, and a helper
to run (and kill, and restart) such a server on one backend store.

Written by hand because what we need is tiny and must be controllable from a test thread: toxiproxy and
mitmproxy are separate daemons (a Go binary, a large Python package) with their own control APIs.

Faults, switchable at any moment from the test:

- ``blackout("reset")``: every open connection is dropped and every new one is closed as soon as it is
  accepted (the client sees a reset / remote disconnect, like a server going away);
  ``blackout("stall")``: connections are accepted and never answered (the client times out, like a
  network partition); ``restore()`` ends either.
- ``refuse_uploads(507)``: artifact uploads (``PUT .../mlflow-artifacts/artifacts/...``) are answered
  with that status, everything else passes (a server whose artifact disk is full); ``refuse_uploads(404,
  PROXY_404_PAGE)``: what a reverse proxy answers (HTML) while its backend restarts.
- ``refuse_requests("/runs/log-batch", b"poison", 500, MLFLOW_500)``: requests whose path and body contain
  those fragments are answered so, without reaching the server (MLflow failing on one value forever).
- ``drop_responses("/runs/log-batch", 1)``: the request reaches the server, the answer never reaches the
  client (a request that timed out client-side but landed).
- ``retarget(url)``: forward to another upstream (a server restarted elsewhere on the same store).
- ``rewrite_responses("/runs/get", function)``: the server's answers to matching requests are passed through
  ``function(bytes) -> bytes`` (a server that lies, e.g. about a run's artifact location).

An upstream that refuses connections (killed server) looks to the client like a dropped connection.
"""

from __future__ import annotations

import collections
import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import requests

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "content-length"}
UPLOAD_PATH = "/mlflow-artifacts/artifacts/"
PROXY_404_PAGE = b"<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center></body></html>"
MLFLOW_500 = b'{"error_code": "INTERNAL_ERROR", "message": "(sqlite3.OperationalError) the fault proxy says no"}'


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream
        self.mode = "pass"  # "pass", "reset" or "stall"
        self.upload_status: int | None = None
        self.upload_body = b"refused by the fault proxy"
        self._refusals: dict[tuple[str, bytes], tuple[int, bytes]] = {}
        self.stats: collections.Counter = collections.Counter()  # what the proxy did, for tests to wait on
        self._drops: dict[str, int] = {}
        self._rewrites: dict[str, object] = {}
        self._restored = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ controls
    def blackout(self, mode: str = "reset") -> None:
        assert mode in ("reset", "stall")
        with self._lock:
            self.mode = mode
            self._restored.clear()
            doomed = list(self._open)
        for sock in doomed:  # wakes their handler threads too
            _drop(sock)

    def restore(self) -> None:
        with self._lock:
            self.mode = "pass"
        self._restored.set()

    def refuse_uploads(self, status: int | None = 507, body: bytes = b"refused by the fault proxy") -> None:
        """Answer artifact uploads with ``status`` and a non-JSON ``body`` (None: let them through again)."""
        self.upload_status, self.upload_body = status, body

    def refuse_requests(self, path_contains: str, body_contains: bytes, status: int | None, body: bytes = b"") -> None:
        """Answer requests whose path and body contain these with ``status`` and ``body`` (JSON if it starts
        with ``{``); None lets them through again."""
        with self._lock:
            if status is None:
                self._refusals.pop((path_contains, body_contains), None)
            else:
                self._refusals[(path_contains, body_contains)] = (status, body)

    def drop_responses(self, path_contains: str, count: int = 1) -> None:
        with self._lock:
            self._drops[path_contains] = count

    def retarget(self, upstream: str) -> None:
        self.upstream = upstream

    def rewrite_responses(self, path_contains: str, function) -> None:
        with self._lock:
            self._rewrites[path_contains] = function

    def close(self) -> None:
        self.restore()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ used by the handler
    def _take_drop(self, path: str) -> bool:
        with self._lock:
            for fragment, left in self._drops.items():
                if left > 0 and fragment in path:
                    self._drops[fragment] = left - 1
                    return True
        return False


def _drop(sock: socket.socket) -> None:
    """Abort a connection: linger 0 makes the close a reset rather than an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def verify_request(self, request, client_address) -> bool:
        if self.proxy.mode == "reset":
            self.proxy.stats["refused_connections"] += 1
            _drop(request)
            return False
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's requests session uses it

    def setup(self) -> None:
        super().setup()
        with self.server.proxy._lock:
            self.server.proxy._open.add(self.connection)

    def finish(self) -> None:
        with self.server.proxy._lock:
            self.server.proxy._open.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, *args) -> None:  # quiet: the test output is for the test
        pass

    def _abort(self, reason: str) -> None:
        self.server.proxy.stats[reason] += 1
        self.close_connection = True
        _drop(self.connection)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        proxy = self.server.proxy
        if proxy.mode == "stall":
            proxy._restored.wait()
            return self._abort("stalled")
        if proxy.mode != "pass":
            return self._abort("dropped")
        body = self._read_body()
        if proxy.upload_status and self.command == "PUT" and UPLOAD_PATH in self.path:
            proxy.stats["refused_uploads"] += 1
            kind = "text/html" if proxy.upload_body.startswith(b"<") else "text/plain"
            return self._answer(proxy.upload_status, proxy.upload_body, {"Content-Type": kind})
        with proxy._lock:
            refusal = next((answer for (path, fragment), answer in proxy._refusals.items()
                            if path in self.path and fragment in body), None)
        if refusal is not None:
            proxy.stats["refused_requests"] += 1
            kind = "application/json" if refusal[1].startswith(b"{") else "text/html"
            return self._answer(refusal[0], refusal[1], {"Content-Type": kind})
        target = urlsplit(proxy.upstream)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            upstream.close()
        except OSError:
            return self._abort("upstream_down")
        if proxy.mode != "pass":  # the blackout began while the server worked: the answer is lost
            return self._abort("dropped")
        if proxy._take_drop(self.path):
            return self._abort("dropped_responses")
        for fragment, rewrite in list(proxy._rewrites.items()):
            if fragment in self.path:
                data = rewrite(data)
                proxy.stats["rewritten"] += 1
        proxy.stats["forwarded"] += 1
        self._answer(response.status, data,
                     {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP})

    def _answer(self, status: int, data: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _relay


class MlflowServer:
    """A real ``mlflow server`` on a SQLite backend and a local artifact root under ``root``, that a test
    may kill (SIGKILL) and start again on the same store (on a new port: point a FaultProxy at it)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait: bool = True) -> MlflowServer:
        with socket.socket() as probe:  # a free loopback port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            start_new_session=True)  # its own process group, so kill() reaches its worker processes
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        if wait:
            self.wait_healthy()
        return self

    def healthy(self) -> bool:
        """Whether the server answers /health now (raises if its process has exited)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-800:]}")
        try:
            return requests.get(f"{self.url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            time.sleep(0.5)  # polling a server that takes ~25 s to come up
        raise RuntimeError(f"mlflow server did not answer /health within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server and every process it started."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
