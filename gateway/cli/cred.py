"""``credgate cred``, ``credgate unwrap`` and ``credgate lease``: issue credentials, and the
leases that record them."""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any

import typer

from gateway.cli.common import GLOBALS, UsageProblem, client, group, parse_duration
from gateway.cli.output import details, emit, table
from gateway.client.urls import seg

cred_app = group("Issue short-lived credentials.")
lease_app = group("Leases: every credential issued, renewed, revoked.")

FORMATS = ("text", "env", "credential-process", "k8s-exec")
# The formats a program consumes (not a person): they need the credential itself, so with
# --wrap the CLI unwraps at once (the connector's wrap-only rule is met, the consumer is this process).
CONSUMER_FORMATS = ("credential-process", "k8s-exec")
Format = Annotated[str, typer.Option(
    "--format",
    help="text; env (export lines for eval); credential-process (AWS credential_process JSON); "
         "k8s-exec (a Kubernetes ExecCredential). JSON or YAML: -o json|yaml.")]
Prefix = Annotated[str, typer.Option(
    "--prefix", help="With --format env: put this before every variable name (e.g. PG_), so USER, "
                     "PASSWORD or HOST of the shell are never overwritten.")]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def credential_format(fmt: str) -> str:
    """The credential format; ``--format json`` (before -o existed) is ``-o json``."""
    if fmt == "json":
        GLOBALS.output = "json"
        return "text"
    if fmt not in FORMATS:
        raise UsageProblem("--format is one of text, env, credential-process, k8s-exec (and -o json|yaml for JSON or YAML)")
    return fmt


class FormatProblem(UsageProblem):
    """The credential has no fields for the format asked (exit 2, one line)."""


def env_name(key: str, prefix: str = "") -> str:
    name = prefix + re.sub(r"[^A-Za-z0-9_]", "_", key).upper()
    if not _ENV_NAME.match(name):
        raise UsageProblem(f"{name!r} is not a valid environment variable name (check --prefix)")
    return name


def _env(out: dict[str, Any], prefix: str = "") -> None:
    lines = {"CREDGATE_LEASE_ID": out["lease_id"], "CREDGATE_EXPIRES_AT": str(out["expires_at"])}
    if out.get("wrap_token"):
        lines["CREDGATE_WRAP_TOKEN"] = out["wrap_token"]
    for k, v in (out.get("credential") or {}).items():
        lines[env_name(k, prefix)] = v
    for k, v in lines.items():
        typer.echo(f"export {k}={shlex.quote(v)}")


def rfc3339(value: Any) -> str:
    """An ISO 8601 / RFC 3339 UTC timestamp, ``Z`` form (as Kubernetes and botocore read it)."""
    from datetime import UTC, datetime

    when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def credential_process(out: dict[str, Any]) -> dict[str, Any]:
    """The AWS ``credential_process`` document (Version 1) of an aws credential."""
    cred = out.get("credential") or {}
    need = ("aws_access_key_id", "aws_secret_access_key")
    if not all(cred.get(k) for k in need):
        raise FormatProblem(
            f"the credential of {out.get('connector')} ({out.get('connector_type') or 'unknown type'}) has no "
            "aws_access_key_id/aws_secret_access_key: --format credential-process needs an aws connector"
        )
    doc = {"Version": 1, "AccessKeyId": cred["aws_access_key_id"], "SecretAccessKey": cred["aws_secret_access_key"]}
    if cred.get("aws_session_token"):
        doc["SessionToken"] = cred["aws_session_token"]
    doc["Expiration"] = rfc3339(out["expires_at"])
    return doc


def exec_credential(out: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes ``ExecCredential`` (client.authentication.k8s.io/v1) of a credential with a token."""
    token = (out.get("credential") or {}).get("token")
    if not token:
        raise FormatProblem(
            f"the credential of {out.get('connector')} ({out.get('connector_type') or 'unknown type'}) has no "
            "token: --format k8s-exec needs a credential with a token key"
        )
    return {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": token, "expirationTimestamp": rfc3339(out["expires_at"])},
    }


def _text(out: dict[str, Any]) -> None:
    typer.echo(f"lease:    {out['lease_id']}")
    typer.echo(f"expires:  {out['expires_at']}" + ("  (ttl capped at the connector's max)" if out.get("ttl_capped") else ""))
    typer.echo(f"renewable: {'yes' if out['renewable'] else 'no'}; {out['revocability']}")
    if out.get("wrap_token"):
        typer.echo(f"wrap token (single use, until {out['wrap_expires_at']}):")
        typer.echo(out["wrap_token"])
    for k, v in (out.get("credential") or {}).items():
        typer.echo(f"{k}={v}")


def _print_credential(out: dict[str, Any], fmt: str, prefix: str = "") -> None:
    if fmt == "env":
        _env(out, prefix)
    elif fmt in CONSUMER_FORMATS:
        import json

        doc = credential_process(out) if fmt == "credential-process" else exec_credential(out)
        typer.echo(json.dumps(doc))
    else:
        emit(out, _text)


def unwrapped(token: str) -> dict[str, Any]:
    """The credential a wrap token holds (the wrap token is the credential: no --token sent)."""
    with client(anonymous=True) as c:
        return c.request("POST", "/v1/unwrap", json={"wrap_token": token})


def revoke_quietly(c: Any, lease_id: str) -> None:
    """Revoke a lease whose credential will not be used; a failure is left to the lease's expiry."""
    from gateway.client.errors import GatewayUnreachable, RequestFailed

    try:
        c.request("POST", f"/v1/leases/{seg(lease_id)}/revoke")
    except (RequestFailed, GatewayUnreachable):
        pass


@cred_app.command("issue")
def cred_issue(
    connector: str,
    resource: str,
    ttl: Annotated[str | None, typer.Option("--ttl", help="e.g. 15m; capped at the connector's max.")] = None,
    wrap: Annotated[bool, typer.Option("--wrap", help="Return a single-use wrap token instead.")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe key.")] = None,
    fmt: Format = "text",
    prefix: Prefix = "",
) -> None:
    """Issue a short-lived credential for one resource.

    For programs: --format credential-process (an AWS profile's credential_process), k8s-exec
    (a kubeconfig exec plugin); with --wrap these unwrap at once and print the credential."""
    fmt = credential_format(fmt)
    if prefix and fmt != "env":
        raise UsageProblem("--prefix goes with --format env")
    body = {"connector": connector, "resource": resource, "ttl_seconds": parse_duration(ttl), "wrap": wrap}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    with client() as c:
        out = c.request("POST", "/v1/credentials", json=body, headers=headers)
        if fmt in CONSUMER_FORMATS:
            if out.get("wrap_token"):
                out = unwrapped(out["wrap_token"])
            try:
                _print_credential(out, fmt)
            except FormatProblem:
                revoke_quietly(c, out["lease_id"])  # nobody can use it: don't leave it live
                raise
            return
    _print_credential(out, fmt, prefix)


def unwrap(
    wrap_token: Annotated[str, typer.Argument(metavar="TOKEN")], fmt: Format = "text", prefix: Prefix = "",
) -> None:
    """Exchange a wrap token for its credential (works once; sends no --token)."""
    fmt = credential_format(fmt)
    if prefix and fmt != "env":
        raise UsageProblem("--prefix goes with --format env")
    _print_credential(unwrapped(wrap_token), fmt, prefix)


LEASE_COLUMNS = [
    ("LEASE", "lease_id"), ("STATE", "state"), ("CONNECTOR", "connector"), ("RESOURCE", "resource"),
    ("EXPIRES", "expires_at"), ("PRINCIPAL", "principal"),
]


@lease_app.command("list")
def lease_list(
    connector: Annotated[str | None, typer.Option("--connector")] = None,
    principal: Annotated[str | None, typer.Option(
        "--principal", help="Owner ISSUER/SUBJECT (k8s/system:serviceaccount:ml:trainer); client:x means credgate/client:x.",
    )] = None,
    state: Annotated[str | None, typer.Option("--state", help="pending, active, revoking, revoked, expired")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
) -> None:
    """List leases (newest last)."""
    with client() as c:
        out = c.get("/v1/leases", connector=connector, principal=principal, state=state, limit=limit)
    emit(out, lambda o: table(o["items"], LEASE_COLUMNS))


@lease_app.command("show")
def lease_show(lease_id: str) -> None:
    """Show a lease."""
    with client() as c:
        out = c.get(f"/v1/leases/{seg(lease_id)}")
    emit(out, details)


@lease_app.command("renew")
def lease_renew(
    lease_id: str,
    ttl: Annotated[str | None, typer.Option("--ttl", help="e.g. 30m; capped as issuance caps it now, never past the lease's max.")] = None,
) -> None:
    """Extend a renewable lease."""
    with client() as c:
        out = c.request("POST", f"/v1/leases/{seg(lease_id)}/renew", json={"ttl_seconds": parse_duration(ttl)})
    emit(out, lambda o: typer.echo(f"{lease_id} now expires {o['expires_at']}"))


@lease_app.command("revoke")
def lease_revoke(
    lease_id: Annotated[str | None, typer.Argument(help="One lease; or use --connector/--principal.")] = None,
    connector: Annotated[str | None, typer.Option("--connector", help="Every live lease of this connector.")] = None,
    principal: Annotated[str | None, typer.Option(
        "--principal", help="Every live lease of this owner, ISSUER/SUBJECT (client:x means credgate/client:x).",
    )] = None,
) -> None:
    """Revoke one lease, or every live lease of a connector and/or principal."""
    if bool(lease_id) == bool(connector or principal):
        raise UsageProblem("give a LEASE_ID, or --connector and/or --principal")
    with client() as c:
        if lease_id:
            out = c.request("POST", f"/v1/leases/{seg(lease_id)}/revoke")
            msg = f"{lease_id}: {out['state']}" + (f" ({out['last_error']}; the reaper retries)" if out["state"] == "revoking" else "")
        else:
            out = c.request("POST", "/v1/leases/revoke", json={"connector": connector, "principal": principal})
            msg = f"revoked {out['revoked']} of {out['matched']} lease(s)" + (
                f"; {len(out['still_revoking'])} still being retried" if out["still_revoking"] else ""
            )
    emit(out, lambda _: typer.echo(msg))
