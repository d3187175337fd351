"""deploy/helm/credgate, rendered by Helm itself and validated against Kubernetes' schemas.

- Rendering: helm-python-sdk, Helm's Go SDK (v4) bundled as a shared library and called
  through ctypes: the real template engine, `fail`, values.schema.json and `helm lint`,
  offline (no cluster; `lookup` returns nothing).
- Validation: kubernetes-validate, the official OpenAPI-derived JSON schemas it ships
  (no download), in strict mode (unknown fields are errors), for the oldest Kubernetes
  the chart supports and the newest the package knows. The ServiceMonitor is a CRD
  those schemas don't cover: its structure is checked here instead.
- Value sets: the defaults, ci/all-features-values.yaml, ci/kek-env-mtls-values.yaml
  a single replica, and a KEK in aws-kms or in vault-transit; plus values the chart must
  refuse (a KMS source without its key, missing KEK Secret,
  SQLite, a typo, ...).
- Beyond the schemas: the security properties, probes, graceful shutdown, the KEK file
  path (simulated with the init container's own command, then loaded by the gateway's
  keyring), and every rendered setting loaded by the gateway's own Settings class.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate as kv
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from gateway.errors import ConfigurationError
from gateway.crypto.keyring import load_keyring, new_key_file
from gateway.web.routes.health import router as health_router
from gateway.settings import Settings, load_settings
from tests.deploy.common import CHART, UID, drain_seconds
from tests.deploy.test_dockerfile import env_of, final

NAMESPACE = "secrets"
RELEASE = "credgate"
MIN_KUBE = "1.29.0"
KUBE_VERSIONS = (MIN_KUBE, kv_utils.latest_version())

VALUE_FILES = {
    "default": None,
    "all-features": "ci/all-features-values.yaml",
    "kek-env-mtls": "ci/kek-env-mtls-values.yaml",
    "single-replica": None,
    "kek-aws-kms": None,
    "kek-vault-transit": None,
}
EXTRA = {
    "single-replica": {"replicaCount": 1, "autoscaling": {"enabled": False}},
    "kek-aws-kms": {"kek": {"source": "aws-kms", "aws": {"keyId": "alias/credgate", "region": "eu-west-1"}},
                    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/credgate"}}},
    "kek-vault-transit": {"kek": {"source": "vault-transit", "vault": {
        "url": "https://vault.example:8200", "key": "credgate", "namespace": "team-a",
        "tokenSecret": "credgate-vault-token", "caSecret": "vault-ca"}}},
}

# Settings the chart sets from its own values (or never sets), not through `config`.
CHART_MANAGED = {
    "data_dir", "database_url", "host", "port", "kek_file", "kek", "bootstrap_token", "bootstrap_token_file", "public_url",
    "tls_cert_file", "tls_key_file", "tls_client_ca_file", "tls_require_client_cert", "tls_client_subjects",
    "tls_key_group_readable", "health_listen",  # with tls.enabled; tls.requireClientCert + tls.healthListenerPort
    # the KEK's source and its options: kek.source, kek.aws, kek.vault (the token as a mounted file only)
    "kek_source", "kek_aws_key_id", "kek_aws_region", "kek_aws_endpoint_url", "kek_vault_url", "kek_vault_mount",
    "kek_vault_key", "kek_vault_token", "kek_vault_token_file", "kek_vault_namespace", "kek_vault_ca_cert",
}
NEVER_DEPLOYED = {"dev"}  # creates a KEK and a data dir on first start: development only
FILE_ONLY = {"audit_sinks"}  # README: audit sinks are set in the config file only


def values_of(name: str) -> dict[str, Any]:
    path = VALUE_FILES[name]
    values = helm.values_from_yaml((CHART / path).read_text()) if path else {}
    return values | EXTRA.get(name, {})


def render(values: dict[str, Any], *, revision: int = 1) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, revision=revision, is_install=True)


@functools.cache
def _rendered(name: str) -> str:
    return json.dumps(render(values_of(name)))


def manifests(name: str) -> list[dict[str, Any]]:
    """Every rendered object of a value set (a fresh copy each call)."""
    out = []
    for path, text in json.loads(_rendered(name)).items():
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def one(name: str, kind: str) -> dict[str, Any]:
    found = [m for m in manifests(name) if m["kind"] == kind]
    assert len(found) == 1, f"{name}: {len(found)} {kind}"
    return found[0]


def kinds(name: str) -> set[str]:
    return {m["kind"] for m in manifests(name)}


def pod_spec(name: str, kind: str = "Deployment") -> dict[str, Any]:
    return one(name, kind)["spec"]["template"]["spec"]


def gateway(name: str) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(name)["containers"] if c["name"] == "credgate"]
    return container


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


SETS = list(VALUE_FILES)


# --- Helm itself ----------------------------------------------------------------------


def test_helm_engine_is_helms_own() -> None:
    assert helm.helm_sdk_version().startswith("v4."), helm.helm_sdk_version()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["kubeVersion"] == f">={MIN_KUBE}-0"
    assert chart["appVersion"] == "0.1.0"


@pytest.mark.parametrize("name", SETS)
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(str(CHART), values_of(name), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); 2 and up are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- Kubernetes schemas -----------------------------------------------------------------


SERVICE_MONITOR_ENDPOINT_KEYS = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
    "bearerTokenSecret", "authorization", "basicAuth", "oauth2", "honorLabels", "honorTimestamps",
    "metricRelabelings", "relabelings", "proxyUrl", "followRedirects", "enableHttp2", "filterRunning",
}


def check_service_monitor(doc: dict[str, Any]) -> None:
    """monitoring.coreos.com/v1 ServiceMonitor: no schema ships for this CRD here, so its
    shape is checked against the fields of the prometheus-operator API used by the chart."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels",
                         "sampleLimit", "attachMetadata"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert set(spec["namespaceSelector"]) <= {"matchNames", "any"}
    assert spec["endpoints"], "at least one endpoint"
    for ep in spec["endpoints"]:
        assert set(ep) <= SERVICE_MONITOR_ENDPOINT_KEYS, set(ep) - SERVICE_MONITOR_ENDPOINT_KEYS
        assert ep["scheme"] in ("http", "https")
        for key in ("interval", "scrapeTimeout"):
            assert isinstance(ep[key], str) and ep[key][-1] in "smh"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", SETS)
def test_manifests_valid_against_kubernetes_schemas(name: str, version: str) -> None:
    checked = 0
    for doc in manifests(name):
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc)
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        checked += 1
    assert checked >= 5


def test_the_schema_validation_is_not_a_no_op() -> None:
    doc = one("default", "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, MIN_KUBE, strict=True)
    doc = one("default", "HorizontalPodAutoscaler")
    doc["spec"]["minReplicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, MIN_KUBE, strict=True)


def test_what_each_value_set_renders() -> None:
    base = {"Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "Job"}
    assert kinds("default") == base
    assert kinds("all-features") == base | {"ServiceMonitor", "ConfigMap"}
    # database.url given as a value: the chart's own Secret carries it (see test_database_url_...).
    assert kinds("kek-env-mtls") == base - {"HorizontalPodAutoscaler", "Job"} | {"ServiceMonitor", "Secret"}
    # One replica: no autoscaler, and no budget (minAvailable 1 of 1 would block every drain).
    assert kinds("single-replica") == base - {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for name in SETS:
        for m in manifests(name):
            if m["kind"] != "ServiceMonitor":
                assert m["metadata"]["namespace"] == NAMESPACE


# --- security ---------------------------------------------------------------------------


def all_pod_specs(name: str) -> list[dict[str, Any]]:
    return [m["spec"]["template"]["spec"] for m in manifests(name) if m["kind"] in ("Deployment", "Job")]


@pytest.mark.parametrize("name", SETS)
def test_pods_run_non_root_read_only_without_privileges(name: str) -> None:
    image_uid = int([c for c in final() if c.cmd == "USER"][-1].value[0].split(":")[0])
    for spec in all_pod_specs(name):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == image_uid == UID
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False, "a Service named credgate would inject CREDGATE_PORT=tcp://..."
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        assert not [v for v in spec["volumes"] if "hostPath" in v]
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["privileged"] is False and sc["runAsNonRoot"] is True, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert "add" not in sc["capabilities"]
            # Requests and limits, for CPU and memory, on every container.
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']}: {kind}"
            # HOME (the image's /tmp) is writable: an emptyDir.
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            if c["name"] != "kek":
                assert env_of(final())["HOME"] in mounts, c["name"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            for mount in c["volumeMounts"]:
                if not mount.get("readOnly"):
                    writable = volumes[mount["name"]]
                    assert "emptyDir" in writable or mount["name"] in ("audit",), f"{c['name']} writes to {mount}"


def test_service_account_token_is_not_mounted() -> None:
    sa = one("default", "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert pod_spec("default")["serviceAccountName"] == sa["metadata"]["name"]


@pytest.mark.parametrize("name", SETS)
def test_no_secret_value_in_any_manifest(name: str) -> None:
    for m in manifests(name):
        # The one Secret the chart may carry: database.url, given as a value (below).
        assert m["kind"] != "Secret" or m["metadata"]["name"] == f"{RELEASE}-database-url"
    for spec in all_pod_specs(name):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for var, entry in env_map(c).items():
                if var in ("CREDGATE_KEK", "CREDGATE_BOOTSTRAP_TOKEN", "CREDGATE_DATABASE_URL"):
                    assert set(entry) == {"name", "valueFrom"}, f"{var} must come from a Secret"


DB_URL = "postgresql://credgate:Pa55-w0rd-CANARY@pg.databases.svc:5432/credgate"


def test_database_url_value_is_rendered_from_a_secret_never_in_clear() -> None:
    out = render({"database": {"existingSecret": "", "url": DB_URL}})
    docs = [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    job = next(d for d in docs if d["kind"] == "Job")
    for doc in docs:
        if doc is not secret:
            assert "CANARY" not in json.dumps(doc), f"{doc['kind']} carries the database password in clear"
    assert "CANARY" not in out[f"{RELEASE}/templates/NOTES.txt"]
    import base64

    assert base64.b64decode(secret["data"]["url"]).decode() == DB_URL and "stringData" not in secret
    # A hook that exists before the migration Job (a pre-install hook itself) needs it.
    notes = secret["metadata"]["annotations"]
    assert notes["helm.sh/hook"] == job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(notes["helm.sh/hook-weight"]) < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert "hook-succeeded" not in notes["helm.sh/hook-delete-policy"]  # the gateway reads it after the hooks
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    for spec in (deployment["spec"]["template"]["spec"], job["spec"]["template"]["spec"]):
        (c,) = [c for c in spec["containers"] if c["name"] in ("credgate", "migrate")]
        ref = env_map(c)["CREDGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "url"}
    kv.validate(secret, MIN_KUBE, strict=True)
    # With existingSecret, that Secret is read and the chart renders none.
    out = render({"database": {"existingSecret": "pg", "key": "dsn", "url": DB_URL}})
    assert "CANARY" not in json.dumps(out)
    ref = env_map(gateway("default"))["CREDGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "credgate-database", "key": "url"}


@pytest.mark.parametrize("name", ["CREDGATE_KEK", "credgate_kek", "Credgate_Kek_File", "CREDGATE_DATABASE_URL",
                                  "CREDGATE_BOOTSTRAP_TOKEN", "CREDGATE_DEV", "CREDGATE_TLS_CLIENT_SUBJECTS"])
def test_extra_env_cannot_set_a_setting_outside_the_allowlist(name: str, tmp_path: Path) -> None:
    values = {"extraEnv": [{"name": name, "value": "1:" + "A" * 43 + "="}]}
    with pytest.raises(helm.HelmValuesError, match="extraEnv"):
        render(values)
    # The templates refuse it too, should the schema be skipped (helm --skip-schema-validation).
    with pytest.raises(helm.HelmRenderError, match=f"extraEnv: {name} is not a setting"):
        render_without_schema(values, tmp_path)


def render_without_schema(values: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    import shutil

    copy = tmp_path / "chart"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with helm.Chart.load(str(copy)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, revision=1, is_install=True)


def test_config_outside_the_allowlist_is_refused_by_the_templates_too(tmp_path: Path) -> None:
    with pytest.raises(helm.HelmRenderError, match="config.kek: not a setting"):
        render_without_schema({"config": {"kek": "1:" + "A" * 43 + "="}}, tmp_path)


def test_extra_env_may_set_allowlisted_settings_and_other_variables() -> None:
    values = {"extraEnv": [
        {"name": "TZ", "value": "UTC"},
        {"name": "CREDGATE_LOG_LEVEL", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "level"}}},
        {"name": "CREDGATE_TRUSTED_PROXIES", "value": "10.42.0.0/16"},
    ]}
    env = {e["name"] for e in render_gateway(values)["env"]}
    assert {"TZ", "CREDGATE_LOG_LEVEL", "CREDGATE_TRUSTED_PROXIES"} <= env


def render_gateway(values: dict[str, Any]) -> dict[str, Any]:
    out = render(values)
    doc = yaml.safe_load(out[f"{RELEASE}/templates/deployment.yaml"])
    (c,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "credgate"]
    return c


def test_settings_allowlist_is_one_list() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = schema["properties"]["config"]["propertyNames"]["enum"]
    env_names = schema["properties"]["extraEnv"]["items"]["properties"]["name"]["anyOf"][1]["enum"]
    assert env_names == [f"CREDGATE_{k.upper()}" for k in allowed]
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    listed = helpers.split('define "credgate.settingsAllowlist" -}}', 1)[1].split("{{-", 1)[0].split()
    assert listed == allowed


@pytest.mark.parametrize("name", SETS)
def test_notes_never_send_operators_to_a_log_for_the_token(name: str) -> None:
    notes = render(values_of(name))[f"{RELEASE}/templates/NOTES.txt"]
    assert "CREDGATE_TOKEN" not in notes and "grep" not in notes
    if values_of(name).get("bootstrapToken", {}).get("existingSecret"):
        assert "the gateway never prints it" in notes
    else:
        assert "kubectl -n secrets create secret generic credgate-bootstrap" in notes
        assert "bootstrapToken.existingSecret=credgate-bootstrap" in notes


# --- probes, graceful shutdown ----------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_probes(name: str) -> None:
    c = gateway(name)
    port_names = {p["name"] for p in c["ports"]}
    if name == "kek-env-mtls":
        # Every client must present a certificate and the kubelet has none: the probes run the
        # image's healthcheck against the plain-HTTP health listener on the pod's loopback.
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CREDGATE_HEALTH_LISTEN"] == "127.0.0.1:8766"
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert c[probe]["exec"] == {"command": ["python", "/usr/local/lib/credgate/healthcheck.py", path]}
            assert "tcpSocket" not in c[probe] and "httpGet" not in c[probe]
        assert 8766 not in {p["containerPort"] for p in c["ports"]}  # loopback only: not a container port
        return
    scheme = "HTTPS" if name == "all-features" else "HTTP"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": scheme}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": scheme}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert "http" in port_names
    gateway_paths = {r.path for r in health_router.routes}
    assert {"/healthz", "/readyz", "/metrics"} <= gateway_paths


@pytest.mark.parametrize("name", SETS)
def test_graceful_shutdown_fits_in_the_grace_period(name: str) -> None:
    spec = pod_spec(name)
    c = gateway(name)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5, "endpoints need a few seconds to drop the pod before it stops accepting"
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain_seconds()
    strategy = one(name, "Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_chart_refuses_a_grace_period_shorter_than_the_drain() -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 15})


# --- the KEK ----------------------------------------------------------------------------


def test_kek_from_a_secret_reaches_the_gateway_as_a_private_file(tmp_path: Path) -> None:
    spec = pod_spec("default")
    (init,) = spec["initContainers"]
    c = gateway("default")
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes["kek-secret"]["secret"]
    assert secret["secretName"] == "credgate-kek" and secret["defaultMode"] == 0o400
    assert volumes["kek"]["emptyDir"]["medium"] == "Memory"
    # The Secret volume is mounted only in the init container; the gateway gets the copy, read-only.
    assert "kek-secret" not in {m["name"] for m in c["volumeMounts"]}
    gw_mount = {m["name"]: m for m in c["volumeMounts"]}["kek"]
    assert gw_mount["readOnly"] is True
    kek_file = env_map(c)["CREDGATE_KEK_FILE"]["value"]
    assert Path(kek_file).parent == Path(gw_mount["mountPath"])
    assert init["image"] == c["image"]

    # What the kubelet makes of a defaultMode-0400 Secret with fsGroup: root-owned, 0440.
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    where = {mounts["kek-secret"]: tmp_path / "secret", mounts["kek"]: tmp_path / "memory"}
    for d in where.values():
        d.mkdir()
    source = tmp_path / "secret" / "kek"
    new_key_file(source)
    os.chmod(source, 0o440)
    with pytest.raises(ConfigurationError, match="readable by group or others"):
        load_keyring(kek_file=source, kek=None, dev=False, dev_file=tmp_path / "unused")
    # The init container's own command, on those directories.
    argv = list(init["command"])
    for i, arg in enumerate(argv):
        for mount_path, local in where.items():
            if arg.startswith(mount_path + "/"):
                argv[i] = str(local / arg.removeprefix(mount_path + "/"))
    subprocess.run(argv, check=True, timeout=30)
    copy = where[gw_mount["mountPath"]] / Path(kek_file).name
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    ring = load_keyring(kek_file=copy, kek=None, dev=False, dev_file=tmp_path / "unused")
    assert ring.versions() == [1]


def test_kek_from_the_environment() -> None:
    spec = pod_spec("kek-env-mtls")
    c = gateway("kek-env-mtls")
    assert "initContainers" not in spec
    assert env_map(c)["CREDGATE_KEK"]["valueFrom"] == {"secretKeyRef": {"name": "credgate-kek", "key": "kek"}}
    assert "CREDGATE_KEK_FILE" not in env_map(c)
    assert not {"kek", "kek-secret"} & {v["name"] for v in spec["volumes"]}


def test_kek_in_aws_kms() -> None:
    spec = pod_spec("kek-aws-kms")
    env = env_map(gateway("kek-aws-kms"))
    assert "initContainers" not in spec
    assert {k: v["value"] for k, v in env.items() if k.startswith("CREDGATE_KEK")} == {
        "CREDGATE_KEK_SOURCE": "aws-kms", "CREDGATE_KEK_AWS_KEY_ID": "alias/credgate",
        "CREDGATE_KEK_AWS_REGION": "eu-west-1",
    }
    assert not {"kek", "kek-secret", "vault-token"} & {v["name"] for v in spec["volumes"]}
    sa = one("kek-aws-kms", "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/credgate")


def test_kek_in_vault_transit_reads_its_token_from_a_mounted_secret() -> None:
    spec = pod_spec("kek-vault-transit")
    c = gateway("kek-vault-transit")
    env = {k: v["value"] for k, v in env_map(c).items() if k.startswith("CREDGATE_KEK")}
    assert env["CREDGATE_KEK_SOURCE"] == "vault-transit" and env["CREDGATE_KEK_VAULT_KEY"] == "credgate"
    assert env["CREDGATE_KEK_VAULT_URL"] == "https://vault.example:8200" and env["CREDGATE_KEK_VAULT_MOUNT"] == "transit"
    assert env["CREDGATE_KEK_VAULT_NAMESPACE"] == "team-a"
    assert "CREDGATE_KEK_VAULT_TOKEN" not in env, "the token is never an environment variable"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert volumes["vault-token"]["secret"]["secretName"] == "credgate-vault-token"
    assert "subPath" not in mounts["vault-token"], "a subPath mount would never see a rotated token"
    assert Path(env["CREDGATE_KEK_VAULT_TOKEN_FILE"]).parent == Path(mounts["vault-token"]["mountPath"])
    assert Path(env["CREDGATE_KEK_VAULT_CA_CERT"]).parent == Path(mounts["vault-ca"]["mountPath"])
    assert volumes["vault-ca"]["secret"]["secretName"] == "vault-ca"
    assert "initContainers" not in spec and not {"kek", "kek-secret"} & set(volumes)


@pytest.mark.parametrize(
    ("values", "error", "match"),
    [
        ({"kek": {"existingSecret": ""}}, helm.HelmRenderError, "kek.existingSecret is required"),
        ({"database": {"existingSecret": "", "url": ""}}, helm.HelmRenderError, "database.existingSecret"),
        ({"database": {"existingSecret": "", "url": "sqlite:////data/x.db"}}, helm.HelmRenderError, "SQLite"),
        ({"tls": {"enabled": True}}, helm.HelmRenderError, "tls.existingSecret"),
        ({"tls": {"enabled": True, "existingSecret": "t", "requireClientCert": True}}, helm.HelmRenderError,
         "clientCA"),
        ({"tls": {"requireClientCert": True}}, helm.HelmRenderError, "need tls.enabled"),
        ({"replicaCountt": 2}, helm.HelmValuesError, "replicaCountt"),
        ({"config": {"dev": True}}, helm.HelmValuesError, "dev"),
        ({"config": {"database_url": "postgresql://x"}}, helm.HelmValuesError, "database_url"),
        ({"kek": {"source": "vault"}}, helm.HelmValuesError, "source"),
        ({"kek": {"source": "kms"}}, helm.HelmValuesError, "source"),
        ({"kek": {"source": "aws-kms"}}, helm.HelmRenderError, "kek.aws.keyId"),
        ({"kek": {"source": "vault-transit", "vault": {"url": "https://v:8200", "key": "k"}}}, helm.HelmRenderError,
         "kek.vault.tokenSecret"),
        ({"kek": {"source": "vault-transit", "vault": {"url": "vault:8200"}}}, helm.HelmValuesError, "url"),
        ({"kms": {"provider": "aws"}}, helm.HelmValuesError, "kms"),
        ({"image": {"digest": "sha256:short"}}, helm.HelmValuesError, "digest"),
        ({"tls": {"healthListenerPort": 8765}}, helm.HelmValuesError, "healthListenerPort"),
        ({"config": {"health_listen": "0.0.0.0:8766"}}, helm.HelmValuesError, "health_listen"),
    ],
)
def test_values_the_chart_refuses(values: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        render(values)


# --- settings: what the chart sets is what the gateway accepts ----------------------------


PLACEHOLDERS = {
    "CREDGATE_DATABASE_URL": "postgresql://credgate:pw@db.example:5432/credgate",
    "CREDGATE_KEK": "1:" + "A" * 43 + "=",
    "CREDGATE_BOOTSTRAP_TOKEN": "cgt_" + "t" * 40,
}


def loaded_settings(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The gateway container's environment and config file, loaded by gateway/settings.py."""
    for var in list(os.environ):
        if var.startswith("CREDGATE_"):
            monkeypatch.delenv(var)
    c = gateway(name)
    for var, entry in env_map(c).items():
        monkeypatch.setenv(var, entry["value"] if "value" in entry else PLACEHOLDERS[var])
    config = None
    if "--config" in c["args"]:
        config_path = Path(c["args"][c["args"].index("--config") + 1])
        (cm,) = [m for m in manifests(name) if m["kind"] == "ConfigMap"]
        config = tmp_path / config_path.name
        config.write_text(cm["data"][config_path.name])
        mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["config"]
        assert config_path.parent == Path(mount)
    return load_settings(config)


@pytest.mark.parametrize("name", SETS)
def test_rendered_settings_load_in_the_gateway(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = loaded_settings(name, tmp_path, monkeypatch)
    assert s.host == "0.0.0.0" and s.port == 8765 and not s.dev
    assert str(s.data_dir) == env_of(final())["CREDGATE_DATA_DIR"]
    assert s.store_url.startswith("postgresql://")
    assert s.log_format == "json"
    c = gateway(name)
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(s.data_dir) in mounts
    if name == "default":
        assert s.issuer_url == f"http://{RELEASE}.{NAMESPACE}.svc:8765"
        assert s.kek_file is not None and str(s.kek_file.parent) in mounts
    if name == "all-features":
        assert s.issuer_url == "https://credgate.example.com"
        assert s.max_body_bytes == 2097152 and s.reaper_interval_seconds == 2.5
        assert s.rate_per_action == {"credentials:issue": [5.0, 10.0]}
        assert s.tls_client_subjects == {"CN=zenml-server,O=acme": "zenml-server"}
        assert [sink["type"] for sink in s.audit_sinks] == ["file", "stdout"]
        assert s.login_issuer == "corp-idp" and s.log_level == "warning"
        assert s.trusted_proxies == ["10.42.0.0/16", "10.43.0.7/32"]  # a list, passed as JSON
        assert s.tls_cert_file is not None and str(s.tls_cert_file.parent) in mounts
        assert s.tls_client_ca_file is not None and str(s.tls_client_ca_file.parent) in mounts
        # The audit file sink's directory is a mounted volume.
        assert any(str(Path(s.audit_sinks[0]["path"]).parent) == m for m in mounts)
        annotations = one(name, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert len(annotations["checksum/config"]) == 64, "pods roll when the config file changes"
    if name == "kek-aws-kms":
        assert s.kek_source == "aws-kms" and s.kek_aws_key_id == "alias/credgate" and s.kek_file is None
    if name == "kek-vault-transit":
        assert s.kek_source == "vault-transit" and s.kek_vault_token_file is not None
        assert str(s.kek_vault_token_file.parent) in mounts and s.kek is None and s.kek_file is None
    if name == "kek-env-mtls":
        assert s.kek is not None and s.kek_file is None
        assert s.tls_require_client_cert and s.issuer_url.startswith("https://")
        assert s.health_address == ("127.0.0.1", 8766)
    # A Secret volume is read through the pod's fsGroup: its key file is group-readable (0440).
    assert s.tls_key_group_readable == (s.tls_cert_file is not None)
    if s.tls_cert_file is not None:  # mounted whole: a renewed Secret reaches the files, reloaded live
        by_path = {m["mountPath"]: m for m in c["volumeMounts"]}
        for f in (s.tls_cert_file, s.tls_client_ca_file):
            if f is not None:
                assert "subPath" not in by_path[str(f.parent)], "a subPath mount would never see a renewal"
    if s.tls_cert_file is None or not s.tls_require_client_cert:
        assert s.health_listen is None


def test_config_keys_cover_every_gateway_setting() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    env_keys = set(schema["properties"]["config"]["propertyNames"]["enum"])
    file_keys = set(schema["properties"]["configFile"]["propertyNames"]["enum"])
    fields = set(Settings.model_fields)
    assert file_keys == env_keys | FILE_ONLY
    groups = [env_keys, CHART_MANAGED, NEVER_DEPLOYED, FILE_ONLY]
    assert sum(len(g) for g in groups) == len(set().union(*groups)), "each setting has one place"
    assert set().union(*groups) == fields, (
        "a setting of gateway/settings.py has no place in the chart (add it to values.schema.json "
        f"config, or to the chart's own values): {fields - set().union(*groups)}; gone: {set().union(*groups) - fields}"
    )


# --- Service, autoscaling, disruption budget, network policy, monitoring, migration ------


@pytest.mark.parametrize("name", SETS)
def test_service_selects_the_gateway_pods(name: str) -> None:
    svc = one(name, "Service")
    pods = one(name, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pods.items()
    assert one(name, "Deployment")["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http" and port["name"] == "http"
    assert {p["name"]: p["containerPort"] for p in gateway(name)["ports"]} == {"http": 8765}


def test_autoscaler_and_budget() -> None:
    dep = one("default", "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = one("default", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = one("default", "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert one("kek-env-mtls", "Deployment")["spec"]["replicas"] == 3
    assert one("kek-env-mtls", "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    all_hpa = one("all-features", "HorizontalPodAutoscaler")["spec"]
    assert [m["resource"]["name"] for m in all_hpa["metrics"]] == ["cpu", "memory"]
    assert one("single-replica", "Deployment")["spec"]["replicas"] == 1


def test_network_policy() -> None:
    np = one("default", "NetworkPolicy")["spec"]
    assert np["podSelector"]["matchLabels"] == one("default", "Deployment")["spec"]["selector"]["matchLabels"]
    assert np["policyTypes"] == ["Ingress", "Egress"]
    assert np["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    ports = [[(p["port"], p["protocol"]) for p in rule["ports"]] for rule in np["egress"]]
    assert ports == [[(53, "UDP"), (53, "TCP")], [(5432, "TCP")]], "only DNS and the database by default"
    full = one("all-features", "NetworkPolicy")["spec"]
    assert len(full["ingress"][0]["from"]) == 2
    assert full["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert len(full["egress"]) == 4
    assert one("kek-env-mtls", "NetworkPolicy")["spec"]["egress"] == [{}]


def test_service_monitor() -> None:
    assert "ServiceMonitor" not in kinds("default"), "off by default: it needs the Prometheus Operator's CRDs"
    sm = one("all-features", "ServiceMonitor")
    svc = one("all-features", "Service")
    check_service_monitor(sm)
    assert sm["metadata"]["namespace"] == "monitoring"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [svc["metadata"]["namespace"]]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics" and ep["scheme"] == "https"
    assert ep["tlsConfig"]["serverName"] == "credgate-prod.secrets.svc"
    assert one("kek-env-mtls", "ServiceMonitor")["spec"]["endpoints"][0]["scheme"] == "https"


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook() -> None:
    job = one("default", "Job")
    notes = job["metadata"]["annotations"]
    assert notes["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in notes["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"] == ["db", "upgrade"] and "command" not in c, "the image's entrypoint: credgate db upgrade"
    assert spec["restartPolicy"] == "Never"
    assert env_map(c)["CREDGATE_DATABASE_URL"] == env_map(gateway("default"))["CREDGATE_DATABASE_URL"]
    assert not {"CREDGATE_KEK", "CREDGATE_KEK_FILE"} & set(env_map(c)), "migrations need no KEK"
    assert c["image"] == gateway("default")["image"]
    # A new job per revision (the previous one is deleted before the hook runs again).
    assert render({}, revision=7)["credgate/templates/migration-job.yaml"].count("credgate-migrate-7") == 1


def test_image_reference() -> None:
    assert gateway("default")["image"] == "credgate:0.1.0"
    digest = "sha256:" + "0123456789abcdef" * 4
    assert gateway("all-features")["image"] == f"registry.example.com/security/credgate@{digest}"
    assert all(c["image"] == gateway("all-features")["image"] for c in pod_spec("all-features")["initContainers"])
