"""Redaction, scrubbing, escaping and failure causes; log formatters; security options."""
import io
import logging

import orjson
import pytest

from asyncproc import config, logs, outcomes, redact


@pytest.fixture(autouse=True)
def no_secrets():
    redact.forget_all()
    yield
    redact.forget_all()


@pytest.mark.parametrize("url, shown", [
    ("redis://:hunter22@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://app:hunter22@redis:6380/1", "rediss://app:***@redis:6380/1"),
    ("https://tok_abcdef@gw.example/v1", "https://***@gw.example/v1"),
    ("http://gw:8000/metrics?token=abc123&x=1", "http://gw:8000/metrics?token=***&x=1"),
    ("http://gw/q?api_key=k&query=up", "http://gw/q?api_key=***&query=up"),
    ("http://gw:8000", "http://gw:8000"),
    ("unix:///run/redis.sock?password=pw12", "unix:///run/redis.sock?password=***"),
    ("http://[::1:bad", "***"),
    ("http://user:pw@host:notaport/", "***"),
])
def test_url_never_shows_credentials(url, shown):
    assert redact.url(url) == shown


def test_registered_secrets_are_scrubbed_in_both_spellings():
    redact.register_url("redis://:p%40ss-word@redis/0")
    redact.register("tok-12345", "", None, "ab")
    text = "auth p@ss-word p%40ss-word tok-12345 ab"
    assert redact.scrub(text) == "auth *** *** *** ab"


def test_escape_keeps_one_line():
    assert redact.escape("a\nINFO forged\r\x1b[31m\u2028") == "a\\nINFO forged\\r\\x1b[31m\\u2028"
    assert redact.escape("plain ünïcode\\n") == "plain ünïcode\\n"


def test_gateway_error_excerpt_is_bounded_and_cleaned():
    body = b"bad\n2026-01-01 ERROR forged line\x1b" + b"x" * 1000
    outcome = outcomes.from_response(400, body, None, 0.0)
    assert "\n" not in outcome.error and "\x1b" not in outcome.error
    assert len(outcome.error) <= len("gateway returned HTTP 400: ") + outcomes.BODY_EXCERPT_CHARS
    assert outcome.error.startswith("gateway returned HTTP 400: bad\\n2026")
    assert outcomes.from_response(404, b"", None, 0.0).error == "gateway returned HTTP 404"


@pytest.mark.parametrize("text, cause", [
    ("redis: WRONGPASS invalid username-password pair or user is disabled.", "authentication failed"),
    ("redis: Authentication required.", "authentication failed"),
    ("connection error: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", "TLS verification failed"),
    ("connection error: EOF occurred in violation of protocol (_ssl.c:2427)", "TLS handshake failed"),
    ("redis: Error 111 connecting to 127.0.0.1:1. Connection refused.", "connection refused"),
    ("connect timeout", "timed out"),
    ("HTTP 401", "authentication failed"),
    ("something else", "unreachable"),
])
def test_cause(text, cause):
    assert redact.cause(text) == cause


def _format(fmt, message, *args, **extra):
    stream = io.StringIO()
    logs.configure(fmt, "INFO")
    logging.getLogger().handlers[0].stream = stream
    try:
        logging.getLogger("t").warning(message, *args, extra=extra)
    finally:
        logs.configure("text", "WARNING")
    return stream.getvalue()


def test_text_logs_escape_what_came_from_outside():
    out = _format("text", "id=%s rejected: %s", "a\nb", "x\r\n2026-01-01T00:00:00.000Z ERROR supervisor forged")
    assert out.count("\n") == 1 and "a\\nb" in out and "\\r\\n2026" in out


def test_logs_scrub_registered_secrets_in_both_formats():
    redact.register("s3cr3t-token")
    assert "s3cr3t-token" not in _format("text", "got %s", "Bearer s3cr3t-token")
    line = _format("json", "got %s", "Bearer s3cr3t-token", id="s3cr3t-token\n")
    assert "s3cr3t-token" not in line
    assert orjson.loads(line)["msg"] == "got Bearer ***"


def test_settings_repr_shows_no_secret():
    settings = config.load_settings(["--redis-url", "redis://:pw-in-url@r/0", "--gateway-token", "tok-secret",
                                     "--redis-password", "redis-secret", "--inference-gateway", "http://g/gw-pass",
                                     "--gateway-header", "X-Key=hdr-secret"], environ={})
    text = repr(settings)
    for secret in ("pw-in-url", "tok-secret", "redis-secret", "gw-pass", "hdr-secret"):
        assert secret not in text


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tests.tls import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def _error(argv, environ=None):
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(argv, environ=environ or {})
    return str(err.value)


def test_security_option_errors_name_the_option_and_never_the_secret(tmp_path, pki):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (["--gateway-header", "X-Key"], "--gateway-header: must be NAME=VALUE"),
        (["--gateway-header", "Bad Name=v"], "--gateway-header: must be NAME=VALUE"),
        (["--gateway-header", "X-Key=a\r\nInjected: yes"], "--gateway-header: X-Key: the value must not"),
        (["--gateway-token-file", str(tmp_path / "none")], "--gateway-token-file: cannot read"),
        (["--gateway-token-file", str(empty)], "--gateway-token-file: " + str(empty) + " is empty"),
        (["--gateway-ca-file", str(empty)], "--gateway-ca-file: "),
        (["--gateway-client-key", str(pki.client_key)], "--gateway-client-key: needs --gateway-client-cert"),
        (["--gateway-client-cert", str(pki.client_cert), "--gateway-client-key", str(pki.other_key)],
         "--gateway-client-cert: cannot load"),
        (["--redis-ca-file", str(pki.ca)], "--redis-ca-file/--redis-client-cert: need a rediss://"),
        (["--inference-gateway", "http://u:url-secret@gw", "--gateway-token", "tok-secret"],
         "--inference-gateway: credentials in the URL (sent as Basic auth) and a bearer token"),
        (["--gateway-token", "tok-secret", "--gateway-header", "Authorization=Basic hdr-secret"],
         "--inference-gateway: a bearer token"),
        (["--inference-gateway", "ftp://u:url-secret@gw"], "--inference-gateway: must be an http:// or https://"),
        (["--redis-url", "http://:url-secret@r"], "--redis-url: must be a redis://"),
    ]
    for argv, problem in cases:
        message = _error(argv)
        assert message.startswith(problem), (argv, message)
        assert "\n" not in message
        for secret in ("url-secret", "tok-secret", "hdr-secret", "Injected"):
            assert secret not in message


def test_queue_credentials_and_their_errors(tmp_path, pki):
    token = tmp_path / "token"
    token.write_text("file-token")
    queues = tmp_path / "queues.json"
    queues.write_text(orjson.dumps({"queues": [
        {"name": "a", "headers": {"X-Tenant": "t1"}, "token": "qa-token"},
        {"name": "b", "gateway": "https://gw-b", "token_file": str(token)},
    ]}).decode())
    settings = config.load_settings(["--queues-file", str(queues), "--gateway-token", "global"], environ={})
    a, b = settings.request_queues
    assert (a.headers, a.token, b.token_file) == ({"X-Tenant": "t1"}, "qa-token", str(token))
    bad = [
        ({"name": "a", "headers": {"X": 1}}, "headers must be an object of strings"),
        ({"name": "a", "headers": {"X": "a\nb"}}, "the value must not hold line breaks"),
        ({"name": "a", "token": "t", "token_file": str(token)}, "give token or token_file, not both"),
        ({"name": "a", "token_file": str(tmp_path / "none")}, "queue a token_file: cannot read"),
        ({"name": "a", "gateway": "http://u:p@gw", "token": "t"}, "credentials in the URL"),
    ]
    for entry, problem in bad:
        queues.write_text(orjson.dumps([entry]).decode())
        assert problem in _error(["--queues-file", str(queues)])


def test_unrecognized_arguments_are_named_without_their_values():
    message = _error(["--gateway-tokn", "tok-secret", "--x=other-secret"])
    assert message == "unrecognized arguments: --gateway-tokn --x"


def test_tls_and_auth_options_are_settings(pki, tmp_path):
    password = tmp_path / "pw"
    password.write_text("pw")
    settings = config.load_settings([
        "--redis-url", "rediss://127.0.0.1:6380/0", "--redis-ca-file", str(pki.ca),
        "--redis-client-cert", str(pki.client_cert), "--redis-client-key", str(pki.client_key),
        "--redis-username", "app", "--redis-password-file", str(password),
        "--gateway-ca-file", str(pki.ca), "--gateway-tls-verify", "false"], environ={"ASYNCPROC_GATEWAY_TOKEN": "tk"})
    assert settings.redis.auth.tls == config.TlsFiles(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert (settings.redis.auth.username, settings.redis.auth.password_file) == ("app", str(password))
    assert settings.gateway.tls == config.TlsFiles(str(pki.ca), "", "", False)
    assert settings.gateway.token == "tk"
