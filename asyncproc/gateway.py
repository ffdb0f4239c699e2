"""Worker-side HTTP: urllib3 connection pools (one per gateway origin, one connection per
thread kept alive), timeouts bounded by the deadline, no hidden retries.

urllib3's pool directly, not requests: requests' per-call machinery (hooks, cookie jars,
proxy lookup in the environment, header merging) cost more CPU than the whole rest of a
dispatch (see the README's performance section).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional

import urllib3
from urllib3 import exceptions as u3

from asyncproc import outcomes
from asyncproc.outcomes import Assignment, Outcome

#: Never start an attempt with less time than this before the deadline.
MIN_ATTEMPT_SECONDS = 0.05
BASE_HEADERS = {"Content-Type": "application/json", "User-Agent": "asyncproc"}


class Gateway:
    """The HTTP side of one worker process, shared by its threads."""

    def __init__(self, pool_size: int, tls: Optional[Any] = None) -> None:
        self.pool_size = max(pool_size, 1)
        self.tls_options = tls_options(tls)
        self._pools: Dict[str, urllib3.HTTPConnectionPool] = {}
        self._timeouts: Dict[tuple, urllib3.Timeout] = {}
        self._lock = threading.Lock()

    def pool(self, origin: str) -> urllib3.HTTPConnectionPool:
        pool = self._pools.get(origin)
        if pool is None:
            with self._lock:
                pool = self._pools.get(origin)
                if pool is None:
                    extra = self.tls_options if origin.startswith("https:") else {}
                    pool = urllib3.connection_from_url(origin, maxsize=self.pool_size, block=True, **extra)
                    self._pools[origin] = pool
        return pool

    def post(self, job: Assignment, clock: Callable[[], float] = time.time) -> Outcome:
        """POST the payload once and classify what came back (SPEC §4)."""
        remaining = job.deadline - clock()
        if remaining < MIN_ATTEMPT_SECONDS:
            return outcomes.expired()
        if remaining > job.request_timeout and remaining > job.connect_timeout:
            timeout = self._timeouts.get((job.connect_timeout, job.request_timeout))
            if timeout is None:  # the common case: the deadline is further than both caps
                timeout = self._timeouts.setdefault(
                    (job.connect_timeout, job.request_timeout),
                    urllib3.Timeout(connect=job.connect_timeout, read=job.request_timeout))
        else:
            timeout = urllib3.Timeout(connect=min(job.connect_timeout, remaining),
                                      read=min(job.request_timeout, remaining))
        started = time.monotonic()
        try:
            response = self.pool(job.origin).urlopen(
                "POST", job.path, body=job.body, headers=job.headers, retries=False, redirect=False,
                timeout=timeout, preload_content=True, assert_same_host=False,
            )
        except u3.NewConnectionError as exc:  # before ConnectTimeoutError: it is a subclass
            return outcomes.connection_failure(f"connection error: {_reason(exc)}", time.monotonic() - started)
        except u3.ConnectTimeoutError:
            return outcomes.connection_failure("connect timeout", time.monotonic() - started)
        except u3.ReadTimeoutError:
            return outcomes.connection_failure("read timeout", time.monotonic() - started)
        except (u3.ProtocolError, u3.HTTPError, OSError) as exc:
            return outcomes.connection_failure(f"connection error: {_reason(exc)}", time.monotonic() - started)
        return outcomes.from_response(response.status, response.data, response.headers.get("Retry-After"),
                                      time.monotonic() - started)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


def tls_options(tls: Optional[Any]) -> Dict[str, Any]:
    """urllib3 pool arguments for a config.TlsFiles: trusted CAs, client certificate (mTLS),
    verification (on unless explicitly turned off; the supervisor warns then)."""
    if tls is None:
        return {}
    options: Dict[str, Any] = {k: v for k, v in (("ca_certs", tls.ca_file), ("cert_file", tls.cert_file),
                                                 ("key_file", tls.key_file)) if v}
    if not tls.verify:
        options.update(cert_reqs="CERT_NONE", assert_hostname=False)
        urllib3.disable_warnings(u3.InsecureRequestWarning)  # said once at start, not per request
    return options


def _reason(exc: BaseException) -> str:
    """The innermost reason, without urllib3's object reprs."""
    text = str(exc)
    for marker in ("Failed to establish a new connection: ", "Connection aborted.', "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = text.strip("()'\" ")
    return text[:160] or type(exc).__name__
