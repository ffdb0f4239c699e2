"""What may be printed: URLs without their credentials, text without the secrets asyncproc
was given, and text from outside without control characters (so it cannot forge a log line).

Every place that prints or labels a URL goes through `url()`; the log formatters pass every
line through `scrub()` as a second net for secrets that reach a message some other way (a
library's error text). Pure: no I/O, no imports beyond the standard library.
"""
from __future__ import annotations

import re
from typing import Optional, Set
from urllib.parse import unquote, urlsplit

REDACTED = "***"
#: Secrets shorter than this are not scrubbed from free text (they would mangle ordinary
#: words); URLs and headers never print them anyway.
MIN_SCRUB_LENGTH = 4
#: Query parameters whose values are credentials (substring match, case-insensitive).
SECRET_PARAM = re.compile(r"pass|token|secret|key|auth|sig|credential|session", re.IGNORECASE)

_secrets: Set[str] = set()
_pattern: Optional[re.Pattern] = None


def url(value: object) -> str:
    """`value` with the password (or a user-only userinfo, often a token) and secret-looking
    query values replaced by ***; anything that does not parse is redacted whole."""
    text = str(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    out = f"{parts.scheme}:" if parts.scheme else ""
    if text[len(out):].startswith("//"):
        out += "//" + netloc
    out += parts.path
    if parts.query:
        out += "?" + "&".join(_param(p) for p in parts.query.split("&"))
    return out + (f"#{parts.fragment}" if parts.fragment else "")


def _param(pair: str) -> str:
    name, eq, value = pair.partition("=")
    return f"{name}={REDACTED}" if eq and value and SECRET_PARAM.search(unquote(name)) else pair


def register(*values: Optional[str]) -> None:
    """Remember secrets (passwords, tokens, header values) so `scrub` removes them."""
    global _pattern
    added = False
    for value in values:
        for form in {value, unquote(value)} if value else ():
            if len(form) >= MIN_SCRUB_LENGTH and form not in _secrets:
                _secrets.add(form)
                added = True
    if added:  # longest first, so a secret containing another is removed whole
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def register_url(value: Optional[str]) -> None:
    """Register the password and the secret query values of a URL."""
    if not value:
        return
    try:
        parts = urlsplit(value)
    except ValueError:
        return
    if parts.password:
        register(parts.password)
    elif parts.username and "@" in parts.netloc and ":" not in parts.netloc.rpartition("@")[0]:
        register(parts.username)  # a user-only userinfo: often a token
    for pair in parts.query.split("&"):
        name, eq, secret = pair.partition("=")
        if eq and secret and SECRET_PARAM.search(unquote(name)):
            register(secret)


def scrub(text: str) -> str:
    """`text` with every registered secret replaced by ***."""
    pattern = _pattern
    return pattern.sub(REDACTED, text) if pattern is not None and text else text


def forget_all() -> None:
    """For tests: no registered secrets."""
    global _pattern
    _secrets.clear()
    _pattern = None


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape(text: str) -> str:
    """Control characters (line breaks included) as visible escapes: one line stays one line."""
    return text.translate(_CONTROL)


def excerpt(data: bytes, limit: int) -> str:
    """At most `limit` characters of outside bytes, decoded leniently, escaped, trimmed."""
    text = escape(data[:limit * 4].decode("utf-8", "replace").strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cause(text: str) -> str:
    """Why a connection failed, in the operator's words, from an exception's text."""
    low = text.lower()
    if any(m in low for m in ("wrongpass", "noauth", "invalid password", "invalid username-password",
                              "authentication", "http 401", "http 403", "noperm")):
        return "authentication failed"
    if "certificate verify failed" in low or "certificate_verify_failed" in low or "hostname mismatch" in low:
        return "TLS verification failed"
    if "ssl" in low or "tls" in low or "eof occurred in violation of protocol" in low:
        return "TLS handshake failed"
    if "refused" in low or "errno 111" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "name resolution" in low:
        return "host not found"
    return "unreachable"
