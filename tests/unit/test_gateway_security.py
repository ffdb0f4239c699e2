"""Gateway authentication and TLS, in-process against a real HTTPS server with a throwaway CA:
the CA file, mutual TLS, verification off, headers and tokens, token file rotation."""
import base64
import os
import time

import pytest

from asyncproc import redact
from asyncproc.config import TlsFiles
from asyncproc.credentials import RouteAuth, TokenFile, basic_auth, origin
from asyncproc.gateway import BASE_HEADERS, Gateway
from asyncproc.outcomes import Assignment, Kind
from tests.gatewaystub import SecureGateway
from tests.tls import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https(pki):
    server = SecureGateway(pki)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls(pki):
    server = SecureGateway(pki, require_client_cert=True)
    yield server
    server.stop()


def job(url, headers=None):
    return Assignment("k", url, "/v1/completions", b'{"prompt": "hi"}', headers or dict(BASE_HEADERS),
                      time.time() + 30, 5.0, 10.0)


def post(url, tls=None, headers=None):
    gateway = Gateway(tls)
    try:
        return gateway.post(job(url, headers))
    finally:
        gateway.close()


def test_https_gateway_trusted_through_the_ca_file(https, pki):
    outcome = post(https.url, TlsFiles(ca_file=str(pki.ca)))
    assert outcome.kind is Kind.OK and outcome.status == 200


def test_an_untrusted_certificate_fails_verification_and_says_so(https, pki):
    outcome = post(https.url, TlsFiles(ca_file=str(pki.other_ca)))
    assert outcome.kind is Kind.RETRY and outcome.status is None
    assert redact.cause(outcome.describe()) == "TLS verification failed"
    assert post(https.url).kind is Kind.RETRY  # the system's CAs do not know the test CA


def test_verification_off_accepts_any_certificate(https, pki):
    outcome = post(https.url, TlsFiles(verify=False))
    assert outcome.kind is Kind.OK


def test_mutual_tls_presents_the_client_certificate(mtls, pki):
    outcome = post(mtls.url, TlsFiles(str(pki.ca), str(pki.client_cert), str(pki.client_key)))
    assert outcome.kind is Kind.OK
    assert mtls.requests()[-1]["peer"] == "client"


@pytest.mark.parametrize("which", ["none", "stranger"])
def test_mutual_tls_without_an_accepted_certificate_fails(mtls, pki, which):
    tls = TlsFiles(str(pki.ca)) if which == "none" else TlsFiles(str(pki.ca), str(pki.other_cert), str(pki.other_key))
    before = len(mtls.requests())
    outcome = post(mtls.url, tls)
    assert outcome.kind is Kind.RETRY and outcome.status is None
    assert len(mtls.requests()) == before


def test_tls_options_do_not_touch_plain_http():
    server = SecureGateway()
    try:
        assert post(server.url, TlsFiles(ca_file="/nonexistent")).kind is Kind.OK
    finally:
        server.stop()


def test_headers_token_and_objective_reach_the_gateway(https, pki):
    auth = RouteAuth(dict(BASE_HEADERS, **{"x-gateway-inference-objective": "o"}), https.url,
                     [("X-Api-Key", "k-123")], token="tok-abc")
    assert post(https.url, TlsFiles(str(pki.ca)), auth.headers).kind is Kind.OK
    seen = https.requests()[-1]["headers"]
    assert seen["Authorization"] == "Bearer tok-abc"
    assert seen["X-Api-Key"] == "k-123" and seen["x-gateway-inference-objective"] == "o"


def test_url_credentials_are_sent_as_basic_auth_and_not_in_the_origin():
    url = "https://user%40corp:p%3Ass@gw.example:8443/v1/chat/completions"
    assert origin(url) == "https://gw.example:8443"
    value = basic_auth(url)
    assert base64.b64decode(value.split()[1]).decode() == "user@corp:p:ss"
    assert RouteAuth({}, url, []).headers["Authorization"] == value
    assert basic_auth("https://gw.example") is None


def test_token_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "token"
    path.write_text("first-token\n")
    token = TokenFile(str(path))
    auth = RouteAuth({}, "http://gw", [], token_file=token)
    assert auth.headers["Authorization"] == "Bearer first-token"
    assert not token.changed() and not auth.refresh()
    # Kubernetes swaps the file (a new inode) rather than rewriting it
    (tmp_path / "token.new").write_text("second-token")
    os.replace(tmp_path / "token.new", path)
    assert token.changed() and auth.refresh()
    assert auth.headers["Authorization"] == "Bearer second-token"


def test_a_missing_or_empty_token_file_keeps_the_last_token(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("kept-token")
    token = TokenFile(str(path))
    path.unlink()
    assert not token.changed() and not token.changed()
    assert token.token == "kept-token"
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1  # once, not per check
    path.write_text("   \n")
    assert not token.changed() and token.token == "kept-token"
    path.write_text("new-token")
    assert token.changed() and token.token == "new-token"
