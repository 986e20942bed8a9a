"""HTTP(S) downloader for the ``urls`` source: timeouts, retries, opt-out headers, bounded redirects and a
bounded per-partition thread pool whose output keeps input order.

Retries are urllib3's ``Retry`` mounted on the session, not a loop of our own: it honours ``Retry-After`` (capped
here, so one server cannot park a worker for an hour), backs off exponentially with jitter, and retries 429/5xx
and failed connections; a read that stalls mid-body is not retried (such servers rarely recover in seconds)."""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from tessera.data_pipeline.sources import UrlsSourceConfig
from tessera import storage

T = TypeVar("T")
# img2dataset's default disallowed_header_directives (img2dataset/main.py): honoured unless respect_optout is off.
IMG2DATASET_OPTOUT = ("noai", "noimageai", "noindex", "noimageindex")
_RETRY_STATUS = (429, 500, 502, 503, 504)


class _CappedRetry(Retry):
    """urllib3's Retry with ``Retry-After`` honoured up to a cap (a server asking for an hour gets ``cap`` s)."""

    def __init__(self, *args, max_retry_after: float = 30.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_retry_after = max_retry_after

    def new(self, **kw) -> "_CappedRetry":
        """A copy for the next attempt (urllib3 calls this), keeping the cap."""
        out = super().new(**kw)
        out.max_retry_after = self.max_retry_after
        return out

    def get_retry_after(self, response) -> float | None:
        """The server's Retry-After in seconds, capped."""
        after = super().get_retry_after(response)
        return None if after is None else min(after, self.max_retry_after)


def retry_policy(cfg: UrlsSourceConfig) -> Retry:
    """What the session retries: connection failures and 429/5xx, ``cfg.retries`` times in all."""
    return _CappedRetry(total=cfg.retries, connect=cfg.retries, read=False, status=cfg.retries, redirect=None,
                        status_forcelist=_RETRY_STATUS, allowed_methods=frozenset({"GET"}),
                        backoff_factor=cfg.backoff_s, backoff_jitter=cfg.backoff_jitter_s,
                        respect_retry_after_header=True, raise_on_status=False,
                        max_retry_after=cfg.max_retry_after_s)


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

    def __init__(self, cfg: UrlsSourceConfig) -> None:
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
            adapter = HTTPAdapter(max_retries=retry_policy(self.cfg), pool_maxsize=self.cfg.threads)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
        return s

    def fetch(self, url: str) -> FetchResult:
        """Fetch one url; never raises."""
        if not url.startswith(("http://", "https://")):
            try:
                return FetchResult(storage.read_bytes(url))
            except Exception as e:  # noqa: BLE001 - counted as read_error
                return FetchResult(None, "read_error", f"{type(e).__name__}: {e}")
        return self._attempt(url)

    def _attempt(self, url: str) -> FetchResult:
        """One GET, with the session's retries; ``retries`` counts the extra attempts the final answer took."""
        t = self.cfg.timeout_s
        try:
            with self._session().get(url, timeout=(t, t), stream=True) as r:
                history = getattr(getattr(r.raw, "retries", None), "history", ())
                n = len(history)
                if r.status_code != 200:
                    reason = "http_404" if r.status_code == 404 else f"http_{r.status_code}"
                    return FetchResult(None, reason, url, retries=n)
                tags = r.raw.headers.getlist("X-Robots-Tag")  # each header on its own: each names its crawler
                if self.cfg.respect_optout and opted_out(tags, self.ua_token, self.optout):
                    return FetchResult(None, "opt_out", "; ".join(tags), retries=n)
                data = r.raw.read(self.cfg.max_bytes + 1, decode_content=True)
                if len(data) > self.cfg.max_bytes:
                    return FetchResult(None, "too_large", f"> {self.cfg.max_bytes} bytes", retries=n)
                return FetchResult(data, retries=n)
        except requests.TooManyRedirects as e:
            return FetchResult(None, "redirect_loop", str(e))
        except requests.ConnectTimeout as e:  # retried by the session until its budget ran out
            return FetchResult(None, "timeout", str(e), retries=self.cfg.retries)
        except (requests.ReadTimeout, TimeoutError) as e:
            return FetchResult(None, "timeout", str(e))
        except requests.ConnectionError as e:
            if "timed out" in str(e).lower():  # urllib3 reports body read stalls as ConnectionError
                return FetchResult(None, "timeout", str(e))
            return FetchResult(None, "connection_error", str(e), retries=self.cfg.retries)
        except requests.RequestException as e:
            return FetchResult(None, "http_error", f"{type(e).__name__}: {e}")

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
