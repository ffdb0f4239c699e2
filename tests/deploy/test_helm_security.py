"""The chart's security values: gateway token from a Secret (as a file, so rotation works),
TLS Secrets for the gateway and Redis, an ACL password file, KEDA TriggerAuthentication,
the NetworkPolicy, no service-account token. Rendered by Helm's own engine."""
import pytest

from asyncproc import config
from tests.deploy.test_helm_chart import CHART, KUBE_VERSION, helm, render, validate

SECURED = {
    "config": {"message-queue-impl": "redis-streams", "inference-gateway": "https://gateway:8443"},
    "redis": {"url": "rediss://redis:6380/0", "username": "asyncproc", "passwordSecret": "redis-acl",
              "tlsSecret": "redis-tls", "clientCert": True},
    "gateway": {"existingSecret": "gateway-credentials", "tlsSecret": "gateway-tls", "clientCert": True},
    "keda": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "extraVolumes": [{"name": "sa-token", "projected": {"sources": [{"serviceAccountToken": {
        "path": "token", "audience": "gateway", "expirationSeconds": 3600}}]}}],
    "extraVolumeMounts": [{"name": "sa-token", "mountPath": "/var/run/secrets/gateway", "readOnly": True}],
}


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_defaults_mount_no_service_account_token_and_no_policy():
    kinds, docs = render()
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert by_kind(docs, "NetworkPolicy") == [] and by_kind(docs, "TriggerAuthentication") == []
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert env == {"ASYNCPROC_REDIS_URL"}


def test_secured_values_render_valid_manifests_that_asyncproc_accepts(tmp_path):
    kinds, docs = render(SECURED)
    validate(docs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in ("gateway-token", "gateway-tls", "redis-password", "redis-tls", "sa-token"):
        assert mounts[name]["readOnly"] is True
    assert volumes["gateway-token"]["secret"]["secretName"] == "gateway-credentials"
    assert volumes["gateway-token"]["secret"]["items"] == [{"key": "gateway-token", "path": "token"}]
    assert volumes["redis-password"]["secret"]["items"] == [{"key": "redis-password", "path": "password"}]
    # every path the chart passes is one the mounts provide, and asyncproc accepts the options
    env = {e["name"]: e.get("value") for e in container["env"] if "value" in e}
    files = {}
    for name, path in env.items():
        if path.startswith("/var/run/secrets/asyncproc/"):
            volume = path.split("/")[5]
            assert mounts[volume]["mountPath"] == "/var/run/secrets/asyncproc/" + volume
            files[name] = path
    assert set(files) == {"ASYNCPROC_GATEWAY_TOKEN_FILE", "ASYNCPROC_GATEWAY_CA_FILE", "ASYNCPROC_GATEWAY_CLIENT_CERT",
                          "ASYNCPROC_GATEWAY_CLIENT_KEY", "ASYNCPROC_REDIS_PASSWORD_FILE", "ASYNCPROC_REDIS_CA_FILE",
                          "ASYNCPROC_REDIS_CLIENT_CERT", "ASYNCPROC_REDIS_CLIENT_KEY"}
    from tests.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    token = tmp_path / "token"
    token.write_text("t0ken")
    local = {"TOKEN_FILE": token, "PASSWORD_FILE": token, "CA_FILE": pki.ca, "CLIENT_CERT": pki.client_cert,
             "CLIENT_KEY": pki.client_key}
    environ = {name: str(next(v for k, v in local.items() if name.endswith(k))) for name in files}
    environ.update(ASYNCPROC_REDIS_URL="rediss://redis:6380/0", ASYNCPROC_REDIS_USERNAME=env["ASYNCPROC_REDIS_USERNAME"])
    settings = config.load_settings(["--inference-gateway", SECURED["config"]["inference-gateway"]], environ)
    assert settings.redis.auth.username == "asyncproc" and settings.gateway.tls.cert_file == str(pki.client_cert)


def test_keda_authenticates_with_the_same_secrets():
    kinds, docs = render(SECURED)
    (auth,) = by_kind(docs, "TriggerAuthentication")
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"password": ("redis-acl", "redis-password"), "ca": ("redis-tls", "ca.crt"),
                    "cert": ("redis-tls", "tls.crt"), "key": ("redis-tls", "tls.key")}
    (trigger,) = kinds["ScaledObject"]["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert trigger["metadata"]["enableTLS"] == "true"
    assert trigger["metadata"]["usernameFromEnv"] == "ASYNCPROC_REDIS_USERNAME"  # the ACL user


def test_network_policy_limits_egress_and_metrics_ingress():
    _, docs = render(SECURED)
    (policy,) = by_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}], "ports": [{"port": "metrics", "protocol": "TCP"}]}]
    ports = [p["port"] for rule in spec["egress"] for p in rule["ports"]]
    assert ports == [53, 53, 6379, 8000]


def test_a_token_value_goes_into_a_secret_of_its_own():
    _, docs = render({"gateway": {"token": "s3cret"}})
    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
    assert secrets["batch-asyncproc-gateway"]["stringData"] == {"gateway-token": "s3cret"}
    (deployment,) = by_kind(docs, "Deployment")
    assert "s3cret" not in str(deployment)


@pytest.mark.parametrize("values", [SECURED, {"gateway": {"token": "x"}, "networkPolicy": {"enabled": True}}])
def test_lint_secured(values):
    report = helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_VERSION)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
