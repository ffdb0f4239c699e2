"""Worker-side HTTP: one pooled requests.Session per process, timeouts bounded by the deadline."""
from __future__ import annotations

import time
from typing import Callable

import requests
from requests.adapters import HTTPAdapter

from asyncproc import outcomes
from asyncproc.outcomes import Assignment, Outcome

#: Never start an attempt with less time than this before the deadline.
MIN_ATTEMPT_SECONDS = 0.05


def make_session(pool_size: int) -> requests.Session:
    """A session whose pool keeps one connection per thread alive; no hidden retries."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(pool_size, 1), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"Content-Type": "application/json", "User-Agent": "asyncproc"})
    return session


def post(session: requests.Session, job: Assignment, clock: Callable[[], float] = time.time) -> Outcome:
    """POST the payload once and classify what came back (SPEC §4)."""
    remaining = job.deadline - clock()
    if remaining < MIN_ATTEMPT_SECONDS:
        return outcomes.expired()
    timeout = (min(job.connect_timeout, remaining), min(job.request_timeout, remaining))
    started = time.monotonic()
    try:
        response = session.post(job.url, data=job.body, headers=dict(job.headers), timeout=timeout)
        body = response.content
    except requests.exceptions.ConnectTimeout:
        return outcomes.connection_failure("connect timeout", time.monotonic() - started)
    except (requests.exceptions.ReadTimeout, requests.exceptions.Timeout):
        return outcomes.connection_failure("read timeout", time.monotonic() - started)
    except requests.exceptions.ConnectionError as exc:
        return outcomes.connection_failure(f"connection error: {_short(exc)}", time.monotonic() - started)
    except requests.exceptions.RequestException as exc:
        return outcomes.connection_failure(f"request failed: {_short(exc)}", time.monotonic() - started)
    return outcomes.from_response(
        response.status_code, body, response.headers.get("Retry-After"), time.monotonic() - started
    )


def _short(exc: Exception) -> str:
    """The innermost reason, without urllib3's object reprs."""
    text = str(exc)
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = text.strip("()'\" ")
    if "] " in text and text.startswith("<"):
        text = text.split("] ", 1)[1]
    return text[:160] or type(exc).__name__
