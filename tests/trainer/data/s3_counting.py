"""A loopback S3 server that counts what it serves: moto's S3 app behind a WSGI middleware (ENVIRONMENT.md).

It counts the body bytes of every GET per object path, so read amplification is measured from outside the loader.
For benchmarks it can add latency to every request and cap the bandwidth of each response (one stream); for
bad-input tests it can cut responses short or give some ranges another ETag. One port per "node", so bytes are
also counted per node. moto keeps its buckets in this process: the session's moto server sees the same buckets.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

_SLICE = 64 * 1024


@dataclass
class Fault:
    """What to do to GETs of one object: cut the next ``truncate`` responses to half, rewrite ranges' ETag."""

    truncate: int = 0
    etag: str | None = None  # ranges not starting at byte 0 answer with this ETag (an object replaced mid-read)


@dataclass
class Traffic:
    """Counters shared by the server's threads."""

    served: Counter = field(default_factory=Counter)  # (port, path) -> GET body bytes
    gets: Counter = field(default_factory=Counter)  # (port, path) -> GET requests
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bytes_of(self, path: str) -> int:
        """Bytes served for one object path (/bucket/key), all ports."""
        with self.lock:
            return sum(n for (_, p), n in self.served.items() if p == path)

    def per_port(self, suffix: str = "") -> dict[int, int]:
        """Bytes served per port, for objects whose path ends with ``suffix``."""
        with self.lock:
            out: Counter = Counter()
            for (port, p), n in self.served.items():
                if p.endswith(suffix):
                    out[port] += n
            return dict(out)

    def reset(self) -> None:
        """Forget what was counted."""
        with self.lock:
            self.served.clear()
            self.gets.clear()


class _Middleware:
    def __init__(self, app, port: int, server: CountingS3) -> None:
        self.app, self.port, self.server = app, port, server

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        if self.server.latency_s:
            time.sleep(self.server.latency_s)
        fault = self.server.faults.get(path) if method == "GET" else None
        ranged_late = environ.get("HTTP_RANGE", "bytes=0-").split("=")[-1].split("-")[0] not in ("", "0")
        truncate = False
        if fault is not None and fault.truncate > 0:
            fault.truncate -= 1
            truncate = True

        def respond(status, headers, exc_info=None):
            if fault is not None and fault.etag and ranged_late:
                headers = [(k, f'"{fault.etag}"' if k.lower() == "etag" else v) for k, v in headers]
            return start_response(status, headers, exc_info)

        body = self.app(environ, respond)
        if method != "GET":
            return body
        return self._count(path, body, truncate)

    def _count(self, path: str, body, truncate: bool):
        data = b"".join(body)
        if hasattr(body, "close"):
            body.close()
        if truncate:
            data = data[: len(data) // 2]  # the connection closes after fewer bytes than Content-Length
        traffic, bps = self.server.traffic, self.server.bytes_per_s
        with traffic.lock:
            traffic.gets[(self.port, path)] += 1
        for i in range(0, len(data), _SLICE):
            piece = data[i:i + _SLICE]
            if bps:
                time.sleep(len(piece) / bps)
            with traffic.lock:
                traffic.served[(self.port, path)] += len(piece)
            yield piece


class CountingS3:
    """Serve moto's S3 on ``ports`` loopback ports (one per node) until ``stop``; ``endpoints`` lists them."""

    def __init__(self, ports: int = 1, latency_s: float = 0.0, bytes_per_s: float | None = None) -> None:
        self.latency_s, self.bytes_per_s = latency_s, bytes_per_s
        self.faults: dict[str, Fault] = {}
        self.traffic = Traffic()
        self._servers, self._threads, self.endpoints = [], [], []
        self._n = ports

    def start(self) -> CountingS3:
        """Start the servers."""
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args, **kwargs) -> None:  # one line per request would flood the test output
                pass

        app = DomainDispatcherApplication(create_backend_app)
        for _ in range(self._n):
            srv = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
            srv.app = _Middleware(app, srv.server_port, self)
            t = threading.Thread(target=srv.serve_forever, daemon=True)
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
            self.endpoints.append(f"http://127.0.0.1:{srv.server_port}")
        return self

    def stop(self) -> None:
        """Stop the servers."""
        for srv in self._servers:
            srv.shutdown()
        for t in self._threads:
            t.join(timeout=10)
