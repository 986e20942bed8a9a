"""A static file server for the ingest benchmarks: ``http.server`` with a realistic listen backlog.

    python bench/http_serve.py PORT DIRECTORY

``python -m http.server`` listens with a backlog of 5 connections. A client with 16-32 concurrent
downloads overflows it; the kernel drops the extra SYNs and the client retransmits them a second
later, so some requests take over 1 s for reasons no real image host has. This server is the same
``ThreadingHTTPServer`` + ``SimpleHTTPRequestHandler`` with the backlog of a production server, and
without the per-request log line.
"""

from __future__ import annotations

import functools
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen() backlog; nginx's default on Linux is 511
    daemon_threads = True


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        """No per-request line on stderr."""


def main() -> None:
    """Serve DIRECTORY on 127.0.0.1:PORT until killed."""
    port, directory = int(sys.argv[1]), sys.argv[2]
    handler = functools.partial(_QuietHandler, directory=directory)
    with _Server(("127.0.0.1", port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
