"""``credgate cred``, ``credgate unwrap`` and ``credgate lease``: issue credentials, and the
leases that record them."""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer

from gateway.cli.common import GLOBALS, UsageProblem, client, group, parse_duration
from gateway.cli.output import details, emit, table
from gateway.client.urls import seg

cred_app = group("Issue short-lived credentials.")
lease_app = group("Leases: every credential issued, renewed, revoked.")

FORMATS = ("text", "env")
Format = Annotated[str, typer.Option(
    "--format", help="The credential as text, or env (export lines for eval). JSON or YAML: -o json|yaml.")]


def credential_format(fmt: str) -> str:
    """The credential format; ``--format json`` (before -o existed) is ``-o json``."""
    if fmt == "json":
        GLOBALS.output = "json"
        return "text"
    if fmt not in FORMATS:
        raise UsageProblem("--format is one of text, env (and -o json|yaml for JSON or YAML)")
    return fmt


def _env(out: dict[str, Any]) -> None:
    lines = {"CREDGATE_LEASE_ID": out["lease_id"], "CREDGATE_EXPIRES_AT": str(out["expires_at"])}
    if out.get("wrap_token"):
        lines["CREDGATE_WRAP_TOKEN"] = out["wrap_token"]
    for k, v in (out.get("credential") or {}).items():
        lines[k.upper().replace("-", "_")] = v
    for k, v in lines.items():
        typer.echo(f"export {k}={shlex.quote(v)}")


def _text(out: dict[str, Any]) -> None:
    typer.echo(f"lease:    {out['lease_id']}")
    typer.echo(f"expires:  {out['expires_at']}" + ("  (ttl capped at the connector's max)" if out.get("ttl_capped") else ""))
    typer.echo(f"renewable: {'yes' if out['renewable'] else 'no'}; {out['revocability']}")
    if out.get("wrap_token"):
        typer.echo(f"wrap token (single use, until {out['wrap_expires_at']}):")
        typer.echo(out["wrap_token"])
    for k, v in (out.get("credential") or {}).items():
        typer.echo(f"{k}={v}")


def _print_credential(out: dict[str, Any], fmt: str) -> None:
    if fmt == "env":
        _env(out)
    else:
        emit(out, _text)


@cred_app.command("issue")
def cred_issue(
    connector: str,
    resource: str,
    ttl: Annotated[str | None, typer.Option("--ttl", help="e.g. 15m; capped at the connector's max.")] = None,
    wrap: Annotated[bool, typer.Option("--wrap", help="Return a single-use wrap token instead.")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe key.")] = None,
    fmt: Format = "text",
) -> None:
    """Issue a short-lived credential for one resource."""
    fmt = credential_format(fmt)
    body = {"connector": connector, "resource": resource, "ttl_seconds": parse_duration(ttl), "wrap": wrap}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    with client() as c:
        out = c.request("POST", "/v1/credentials", json=body, headers=headers)
    _print_credential(out, fmt)


def unwrap(wrap_token: Annotated[str, typer.Argument(metavar="TOKEN")], fmt: Format = "text") -> None:
    """Exchange a wrap token for its credential (works once; sends no --token)."""
    fmt = credential_format(fmt)
    with client(anonymous=True) as c:
        out = c.request("POST", "/v1/unwrap", json={"wrap_token": wrap_token})
    _print_credential(out, fmt)


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
