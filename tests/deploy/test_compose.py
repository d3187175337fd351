"""deploy/compose.yaml: validated against the Compose Specification's JSON schema (the
copy check-jsonschema ships, read offline), after compose-style variable interpolation,
and checked for the structure the deployment relies on: PostgreSQL with a health check,
a one-shot migration job that the two gateway replicas wait for, a read-only non-root
gateway with tmpfs where it writes, the KEK as a compose secret, and a stop grace period
longer than the gateway's drain. No Docker engine here: `docker compose config/up` is
not run.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.settings import Settings
from tests.deploy.common import COMPOSE, DEPLOY, UID, drain_seconds, duration_seconds
from tests.deploy.test_dockerfile import env_of, final

VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
ENV = {"CREDGATE_DB_PASSWORD": "pw-from-dot-env", "CREDGATE_BOOTSTRAP_TOKEN": "cgt_" + "b" * 40}


class Unset(Exception):
    pass


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and
    ${VAR:+replacement}/${VAR+replacement}."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        value = env.get(name)
        empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-") and empty:
            return arg
        if op in (":?", "?") and empty:
            raise Unset(f"{name}: {arg}")
        if op in (":+", "+"):
            return "" if empty else arg
        return value or ""

    return VAR.sub(one, node.replace("$$", "\0")).replace("\0", "$")


def schema() -> dict[str, Any]:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(raw(), ENV if env is None else env)


def errors(doc: dict[str, Any]) -> list[str]:
    s = schema()
    cls = jsonschema.validators.validator_for(s)
    validator = cls(s, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_valid_against_the_compose_spec_schema() -> None:
    assert schema()["$id"] == "compose_spec.json"
    assert errors(raw()) == []
    assert errors(compose()) == []


def test_the_schema_check_is_not_a_no_op() -> None:
    doc = compose()
    doc["services"]["credgate"]["read_onyl"] = True
    assert any("read_onyl" in e for e in errors(doc))
    doc = compose()
    doc["services"]["credgate"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert errors(doc)


def test_database_password_must_be_given() -> None:
    with pytest.raises(Unset, match="CREDGATE_DB_PASSWORD"):
        compose({"CREDGATE_BOOTSTRAP_TOKEN": ENV["CREDGATE_BOOTSTRAP_TOKEN"]})
    url = compose()["services"]["credgate"]["environment"]["CREDGATE_DATABASE_URL"]
    assert url == "postgresql://credgate:pw-from-dot-env@postgres:5432/credgate"
    assert "pw-from-dot-env" not in COMPOSE.read_text()


def test_postgres_has_a_health_check_and_a_private_network() -> None:
    doc = compose()
    pg = doc["services"]["postgres"]
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert pg["networks"] == ["db"]
    assert doc["networks"]["db"]["internal"] is True
    assert "ports" not in pg, "PostgreSQL is not published"
    assert pg["environment"]["POSTGRES_PASSWORD"] == ENV["CREDGATE_DB_PASSWORD"]


def test_migration_is_a_one_shot_job_after_postgres() -> None:
    job = compose()["services"]["migrate"]
    assert job["command"] == ["db", "upgrade"]
    assert job["restart"] == "no"
    assert job["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert job["environment"]["CREDGATE_DATABASE_URL"].startswith("postgresql://")
    assert "secrets" not in job, "migrations need no KEK"
    hardened(job)


def hardened(service: dict[str, Any]) -> None:
    assert service["read_only"] is True
    assert service["user"] == f"{UID}:{UID}"
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    mounts = {t.split(":")[0] for t in service["tmpfs"]}
    assert env_of(final())["HOME"] in mounts, "HOME (the image's /tmp) must be writable"


def test_two_gateway_replicas_after_the_migration() -> None:
    doc = compose()
    gw = doc["services"]["credgate"]
    assert gw["deploy"]["replicas"] == 2
    assert gw["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert gw["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert gw["image"] == doc["services"]["migrate"]["image"]
    assert gw["build"]["dockerfile"] == "deploy/Dockerfile" and gw["build"]["context"] == ".."
    # Two replicas can't share one host port: a range, one port each, on the loopback.
    assert gw["ports"] == ["127.0.0.1:8765-8766:8765"]
    assert set(gw["networks"]) == {"db", "default"}
    hardened(gw)
    data_dir = env_of(final())["CREDGATE_DATA_DIR"]
    assert any(t.split(":")[0] == data_dir for t in gw["tmpfs"])


def test_gateway_settings_and_kek_secret() -> None:
    doc = compose()
    gw = doc["services"]["credgate"]
    env = gw["environment"]
    assert env["CREDGATE_KEK_FILE"] == "/run/secrets/kek"
    assert gw["secrets"] == [{"source": "kek", "target": "kek"}]
    assert doc["secrets"]["kek"] == {"file": "./kek"}
    assert "CREDGATE_KEK" not in env
    assert env["CREDGATE_HOST"] == "0.0.0.0"
    assert env["CREDGATE_PUBLIC_URL"] == "http://credgate:8765"
    # Only real settings (an unknown CREDGATE_* would be ignored silently), and the
    # gateway's own settings class accepts them.
    names = {f"CREDGATE_{n.upper()}" for n in Settings.model_fields}
    assert set(env) <= names
    settings = Settings(**{k.removeprefix("CREDGATE_").lower(): v for k, v in env.items()})
    assert settings.store_url.startswith("postgresql://") and settings.port == 8765


def test_health_check_and_graceful_stop() -> None:
    gw = compose()["services"]["credgate"]
    assert gw["healthcheck"]["test"] == ["CMD", "python", "/usr/local/lib/credgate/healthcheck.py", "/readyz"]
    assert gw["stop_signal"] == "SIGTERM"
    assert duration_seconds(gw["stop_grace_period"]) > drain_seconds(), (
        "Docker would SIGKILL the gateway while it still drains in-flight requests"
    )


def test_every_service_uses_exec_form_commands() -> None:
    for name, service in compose()["services"].items():
        for key in ("command", "entrypoint"):
            if key in service:
                assert isinstance(service[key], list), f"{name}.{key}: exec form"
        if "healthcheck" in service and "test" in service["healthcheck"]:
            assert service["healthcheck"]["test"][0] == "CMD", f"{name}: no shell in the health check"


def test_interpolation_helper() -> None:
    doc = {"a": "${X:-d}", "b": "${Y-d}", "c": "$${X}", "d": ["${X}"]}
    assert interpolate(copy.deepcopy(doc), {"X": "1", "Y": ""}) == {"a": "1", "b": "", "c": "${X}", "d": ["1"]}
    assert interpolate(copy.deepcopy(doc), {})["a"] == "d"


def test_the_bootstrap_token_is_chosen_never_printed() -> None:
    # The gateway prints a generated token only in --dev; compose runs `serve` (a log, not a
    # terminal), so the operator chooses the first admin token in .env and compose needs it.
    with pytest.raises(Unset, match="CREDGATE_BOOTSTRAP_TOKEN"):
        compose({"CREDGATE_DB_PASSWORD": "pw"})
    gw = compose()["services"]["credgate"]
    assert gw["environment"]["CREDGATE_BOOTSTRAP_TOKEN"] == ENV["CREDGATE_BOOTSTRAP_TOKEN"]
    assert "--dev" not in gw["command"] and "CREDGATE_DEV" not in gw["environment"]
    assert "logs credgate | grep" not in COMPOSE.read_text()


# --- compose.kms.yaml: the KEK held by a KMS ------------------------------------------------

COMPOSE_KMS = DEPLOY / "compose.kms.yaml"


def merged(env: dict[str, str]) -> dict[str, Any]:
    """compose.yaml with compose.kms.yaml over it, merged as compose merges: mappings key by
    key (the override wins), a service's secrets by target."""
    def merge(base: Any, over: Any, key: str = "") -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                out[k] = merge(base[k], v, k) if k in base else v
            return out
        if key == "secrets" and isinstance(base, list) and isinstance(over, list):
            by_target = {item["target"]: item for item in base + over}
            return list(by_target.values())
        return over

    return merge(interpolate(raw(), env), interpolate(yaml.safe_load(COMPOSE_KMS.read_text()), env))


def gateway_settings(doc: dict[str, Any]) -> Settings:
    env = doc["services"]["credgate"]["environment"]
    names = {f"CREDGATE_{n.upper()}" for n in Settings.model_fields}
    settings = {k.removeprefix("CREDGATE_").lower(): v for k, v in env.items() if k.startswith("CREDGATE_")}
    assert set(k for k in env if k.startswith("CREDGATE_")) <= names
    return Settings(**settings)


def test_kms_override_is_valid_and_needs_a_source() -> None:
    assert errors(yaml.safe_load(COMPOSE_KMS.read_text())) == []
    with pytest.raises(Unset, match="CREDGATE_KEK_SOURCE"):
        merged(ENV)
    doc = merged(ENV | {"CREDGATE_KEK_SOURCE": "aws-kms", "CREDGATE_KEK_AWS_KEY_ID": "alias/credgate"})
    assert errors(doc) == []


def test_kms_override_aws_kms_settings_load() -> None:
    doc = merged(ENV | {"CREDGATE_KEK_SOURCE": "aws-kms", "CREDGATE_KEK_AWS_KEY_ID": "alias/credgate",
                        "CREDGATE_KEK_AWS_REGION": "eu-west-1"})
    s = gateway_settings(doc)
    assert s.kek_source == "aws-kms" and s.kek_aws_key_id == "alias/credgate" and s.kek_aws_region == "eu-west-1"
    assert s.kek_file is None and s.kek_vault_token_file is None  # empty variables are unset settings
    assert doc["secrets"]["kek"] == {"file": "/dev/null"}, "no ./kek needed"


def test_kms_override_vault_transit_token_is_a_secret_file() -> None:
    doc = merged(ENV | {"CREDGATE_KEK_SOURCE": "vault-transit", "CREDGATE_KEK_VAULT_URL": "https://vault:8200",
                        "CREDGATE_KEK_VAULT_KEY": "credgate", "CREDGATE_KEK_VAULT_TOKEN_PATH": "./vault-token"})
    s = gateway_settings(doc)
    assert s.kek_source == "vault-transit" and s.kek_vault_mount == "transit" and s.kek_vault_key == "credgate"
    gw = doc["services"]["credgate"]
    assert {"source": "vault-token", "target": "vault-token"} in gw["secrets"]
    assert str(s.kek_vault_token_file) == "/run/secrets/vault-token"
    assert doc["secrets"]["vault-token"] == {"file": "./vault-token"}
    assert "CREDGATE_KEK_VAULT_TOKEN" not in gw["environment"], "the token is never an environment variable"

