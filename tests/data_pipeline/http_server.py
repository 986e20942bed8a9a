"""A threaded HTTP server on 127.0.0.1 with programmable per-path behaviours, for source tests.

    with FixtureHTTPServer() as srv:
        url = srv.add("/a.jpg", jpeg_bytes)                        # 200 with the bytes
        srv.add("/gone", status=404)                               # any status
        srv.add("/slow", body, delay_s=2.0)                        # stalls before answering
        srv.add("/loop", redirect="/loop")                         # redirect loop
        srv.add("/x.jpg", body, headers={"X-Robots-Tag": "noai"})  # opt-out header
        srv.add("/flaky", body, fail_first=2)                      # 503 twice, then 200
        srv.add("/busy", body, fail_first=1, fail_headers={"Retry-After": "1"})
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """How the server answers one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    redirect: str | None = None
    fail_first: int = 0  # answer 503 this many times before behaving normally
    fail_headers: dict[str, str] = field(default_factory=dict)  # sent with those 503s (e.g. Retry-After)


class FixtureHTTPServer:
    """Serves registered routes; unknown paths are 404. Counts hits per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.user_agents: list[str] = []
        self._lock = threading.Lock()
        handler = self._make_handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True  # stalled handlers must not block shutdown
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        """Full url of a path."""
        return self.base_url + path

    def add(self, path: str, body: bytes = b"", **behaviour) -> str:
        """Register a route (Route fields as keywords); returns its full url."""
        self.routes[path] = Route(body=body, **behaviour)
        return self.url(path)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FixtureHTTPServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                with srv._lock:
                    srv.hits[path] += 1
                    n = srv.hits[path]
                    srv.user_agents.append(self.headers.get("User-Agent", ""))
                route = srv.routes.get(path)
                if route is None:
                    return self._send(404, b"not found", {})
                if route.delay_s:
                    time.sleep(route.delay_s)
                if n <= route.fail_first:
                    return self._send(503, b"busy", route.fail_headers)
                if route.redirect is not None:
                    return self._send(302, b"", {"Location": srv.url(route.redirect)})
                self._send(route.status, route.body, route.headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        return Handler
