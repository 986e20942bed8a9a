"""HTTP(S) downloader for the ``urls`` source: timeouts, retries with backoff, opt-out headers,
bounded redirects and a bounded per-partition thread pool whose output keeps input order."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import requests

from tessera.data_pipeline.sources import SourceConfig
from tessera import storage

T = TypeVar("T")
# img2dataset's default disallowed_header_directives (img2dataset/main.py): honoured unless respect_optout is off.
IMG2DATASET_OPTOUT = ("noai", "noimageai", "noindex", "noimageindex")
_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class FetchResult:
    """Bytes on success, or a counted reject reason with a detail string."""

    data: bytes | None
    error: str | None = None
    detail: str = ""
    retries: int = 0


def opted_out(header_values: list[str] | str | None, ua_token: str,
              directives: Iterable[str] = IMG2DATASET_OPTOUT) -> bool:
    """True if an X-Robots-Tag header disallows use, decided as img2dataset's ``is_disallowed``: each header is
    ``[user-agent:] directive, directive, ...``, addressed to every crawler or to one, and forbids if it is
    addressed to all or to our user-agent token and names one of ``directives``."""
    wanted = {d.strip().lower() for d in directives}
    values = [header_values] if isinstance(header_values, str) else list(header_values or [])
    for value in values:
        agent, sep, rest = value.partition(":")
        if sep and agent.strip().lower() != ua_token:
            continue  # a header addressed to another crawler ("otherbot: noai")
        if any(d.strip().lower() in wanted for d in (rest if sep else value).split(",")):
            return True
    return False


class Downloader:
    """Fetches urls (http/https via requests; local paths and s3:// via tessera.storage)."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.ua_token = cfg.user_agent.split("/", 1)[0].strip().lower()
        self.optout = (*IMG2DATASET_OPTOUT, *cfg.extra_optout_directives)
        self._local = threading.local()  # one requests.Session (connection pool) per thread

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = self.cfg.user_agent
            s.max_redirects = self.cfg.max_redirects
            self._local.session = s
        return s

    def fetch(self, url: str) -> FetchResult:
        """Fetch one url; never raises."""
        if not url.startswith(("http://", "https://")):
            try:
                return FetchResult(storage.read_bytes(url))
            except Exception as e:  # noqa: BLE001 - counted as read_error
                return FetchResult(None, "read_error", f"{type(e).__name__}: {e}")
        attempt = 0
        while True:
            result, retry = self._attempt(url)
            if not retry or attempt >= self.cfg.retries:
                result.retries = attempt
                return result
            time.sleep(self.cfg.backoff_s * 2**attempt)  # exponential backoff
            attempt += 1

    def _attempt(self, url: str) -> tuple[FetchResult, bool]:
        """One GET; returns (result, worth retrying)."""
        t = self.cfg.timeout_s
        try:
            with self._session().get(url, timeout=(t, t), stream=True) as r:
                if r.status_code != 200:
                    reason = "http_404" if r.status_code == 404 else f"http_{r.status_code}"
                    return FetchResult(None, reason, url), r.status_code in _RETRY_STATUS
                tags = r.raw.headers.getlist("X-Robots-Tag")  # each header on its own: each names its crawler
                if self.cfg.respect_optout and opted_out(tags, self.ua_token, self.optout):
                    return FetchResult(None, "opt_out", "; ".join(tags)), False
                data = r.raw.read(self.cfg.max_bytes + 1, decode_content=True)
                if len(data) > self.cfg.max_bytes:
                    return FetchResult(None, "too_large", f"> {self.cfg.max_bytes} bytes"), False
                return FetchResult(data), False
        except requests.TooManyRedirects as e:
            return FetchResult(None, "redirect_loop", str(e)), False
        except requests.ConnectTimeout as e:
            return FetchResult(None, "timeout", str(e)), True
        except (requests.ReadTimeout, TimeoutError) as e:
            # A server that stalls mid-response rarely recovers within seconds; don't wait again.
            return FetchResult(None, "timeout", str(e)), False
        except requests.ConnectionError as e:
            if "timed out" in str(e).lower():  # urllib3 reports body read stalls as ConnectionError
                return FetchResult(None, "timeout", str(e)), False
            return FetchResult(None, "connection_error", str(e)), True
        except requests.RequestException as e:
            return FetchResult(None, "http_error", f"{type(e).__name__}: {e}"), False

    def map_ordered(self, items: Iterable[T], url_of: Callable[[T], str]) -> Iterator[tuple[T, FetchResult]]:
        """Fetch items concurrently; yield (item, result) in input order, <= 4*threads in flight."""
        window: collections.deque[tuple[T, Future]] = collections.deque()
        limit = 4 * self.cfg.threads  # bounds memory: finished bytes wait at most this many behind
        with ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="fetch") as pool:
            for item in items:
                window.append((item, pool.submit(self.fetch, url_of(item))))
                if len(window) >= limit:
                    head, fut = window.popleft()
                    yield head, fut.result()
            while window:
                head, fut = window.popleft()
                yield head, fut.result()
