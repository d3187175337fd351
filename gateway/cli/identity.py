"""``credgate issuer``, ``client``, ``admin-key`` and ``run``: who may call the gateway
(trusted issuers, OAuth2 clients, admin API keys) and the tokens of pipeline runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli import crud
from gateway.cli.common import UsageProblem, client, group, key_values, parse_duration, read_json_object
from gateway.cli.cred import credential_format
from gateway.cli.output import details, emit
from gateway.client.urls import seg

issuer_app = group("Trusted issuers: identity providers whose JWTs the gateway accepts.")
client_app = group("OAuth2 clients: services that get gateway tokens.")
admin_key_app = group("Admin API keys.")
run_app = group("Run tokens: a subset of your rights for one pipeline run.")

JWKS = 'a JWK set: {"keys": [...]}'


# --- trusted issuers -------------------------------------------------------------


def _issuer(out: dict[str, Any]) -> None:
    inline = len((out.get("jwks") or {}).get("keys", []))
    details(out, [
        ("issuer", "name"),
        ("issuer url", "issuer_url"),
        ("keys", lambda o: o["jwks_url"] or f"inline JWK set ({inline} key(s))"),
        ("audiences", "audiences"),
        ("algorithms", "algorithms"),
        ("leeway", lambda o: f"{o['leeway_seconds']}s"),
        ("claims", lambda o: ", ".join(f"{k}={v}" for k, v in sorted((o.get("claim_mapping") or {}).items()))
         or "subject=sub (default)"),
        ("role map", lambda o: ", ".join(f"{g}={'+'.join(r)}" for g, r in sorted((o.get("role_mapping") or {}).items()))),
    ])


@issuer_app.command("add")
def issuer_add(
    name: str,
    issuer_url: Annotated[str, typer.Option("--issuer-url", help="The exact `iss` of its tokens.")],
    audience: Annotated[list[str], typer.Option("--audience", help="Accepted `aud` (repeatable).")],
    jwks_url: Annotated[str | None, typer.Option("--jwks-url", help="Where its public keys are published.")] = None,
    jwks_file: Annotated[Path | None, typer.Option("--jwks-file", help="A JWK set file (public keys), instead.")] = None,
    algorithm: Annotated[list[str] | None, typer.Option("--algorithm", help="Allowed alg (repeatable) [default: RS256, ES256].")] = None,
    leeway: Annotated[int | None, typer.Option("--leeway", min=0, max=60, help="Clock leeway in seconds [default: 30].")] = None,
    claim_map: Annotated[list[str] | None, typer.Option("--map", help="NAME=CLAIM: subject, groups, project or run (repeatable).")] = None,
    role_map: Annotated[list[str] | None, typer.Option("--role-map", help="GROUP=ROLE: a group's built-in role (repeatable).")] = None,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="Refuse to save unless its JWK set can be read and has a usable key.")] = True,
) -> None:
    """Trust an issuer's JWTs (or replace its settings). Checks its keys first (see `issuer check`)."""
    if (jwks_url is None) == (jwks_file is None):
        raise UsageProblem("give exactly one of --jwks-url URL and --jwks-file FILE")
    body: dict[str, Any] = {
        "issuer_url": issuer_url,
        "audiences": audience,
        "claim_mapping": dict(key_values(claim_map or [], "--map", "groups=groups")),
        "role_mapping": {},
    }
    if jwks_url is not None:
        body["jwks_url"] = jwks_url
    else:
        assert jwks_file is not None
        body["jwks"] = read_json_object(jwks_file, JWKS)
    for idp_group, roles in key_values(role_map or [], "--role-map", "credgate-admins=admin"):
        wanted = body["role_mapping"].setdefault(idp_group, [])
        wanted.extend(r.strip() for r in roles.split(",") if r.strip() and r.strip() not in wanted)
    if algorithm:
        body["algorithms"] = algorithm
    if leeway is not None:
        body["leeway_seconds"] = leeway
    with client() as c:
        out = c.request("PUT", f"/v1/issuers/{seg(name)}", json=body, params={"check": True} if check else None)
    emit(out, lambda o: typer.echo(f"issuer {o['name']} ({o['issuer_url']}) saved"))


@issuer_app.command("check")
def issuer_check(name: str) -> None:
    """Read an issuer's JWK set now (from its jwks_url) and list its keys; exit 1 if none is usable."""
    with client() as c:
        out = c.request("POST", f"/v1/issuers/{seg(name)}/check")

    def human(o: dict[str, Any]) -> None:
        state = "ok" if o["ok"] else f"{o['code']}"
        typer.echo(f"{o['name']}: {state}, {o['usable_keys']} usable key(s) of {len(o['keys'])} in {o['source']}")
        for k in o["keys"]:
            what = "usable" if k["usable"] else f"unusable: {k['problem']}"
            typer.echo(f"  kid={k['kid'] or '-'} kty={k['kty'] or '-'} alg={k['alg'] or '-'}: {what}")
        if not o["ok"]:
            typer.echo(f"  {o['message']}")

    emit(out, human)
    if not out["ok"]:
        raise typer.Exit(1)


crud.add_list(issuer_app, "/v1/issuers", [
    ("NAME", "name"), ("ISSUER URL", "issuer_url"), ("AUDIENCES", "audiences"),
], "List trusted issuers.")
crud.add_show(issuer_app, "/v1/issuers", "Show a trusted issuer.", human=_issuer)
crud.add_rm(issuer_app, "/v1/issuers", "issuer", "Stop trusting an issuer.")


# --- OAuth2 clients ----------------------------------------------------------------


def _state(item: dict[str, Any]) -> str:
    return f"revoked {item['revoked_at']}" if item["revoked_at"] else "active"


@client_app.command("create")
def client_create(
    client_id: Annotated[str, typer.Argument(metavar="ID")],
    role: Annotated[list[str] | None, typer.Option("--role", help="admin, operator or auditor (repeatable).")] = None,
    token_ttl: Annotated[str | None, typer.Option("--token-ttl", help="Lifetime of its tokens, e.g. 15m [default: 15m].")] = None,
    jwks_file: Annotated[Path | None, typer.Option("--jwks-file", help="Public keys for private_key_jwt; no secret is made.")] = None,
) -> None:
    """Register an OAuth2 client; its secret (if any) is printed once."""
    body: dict[str, Any] = {"client_id": client_id, "roles": role or []}
    if token_ttl is not None:
        body["token_ttl_seconds"] = parse_duration(token_ttl)
    if jwks_file is not None:
        body["jwks"] = read_json_object(jwks_file, JWKS)
    with client() as c:
        out = c.request("POST", "/v1/clients", json=body)

    def human(o: dict[str, Any]) -> None:
        roles = ", ".join(o["roles"]) or "no roles"
        if o.get("client_secret"):
            typer.echo(f"created client {o['client_id']} ({roles}); its secret, shown once:")
            typer.echo(f"CREDGATE_CLIENT_SECRET={o['client_secret']}")
        else:
            typer.echo(f"created client {o['client_id']} ({roles}; {o['auth_method']})")

    emit(out, human)


crud.add_list(client_app, "/v1/clients", [
    ("ID", "client_id"), ("ROLES", "roles"), ("TOKEN TTL", lambda cl: f"ttl={cl['token_ttl_seconds']}s"),
    ("AUTH", "auth_method"), ("STATE", _state),
], "List OAuth2 clients (never their secrets: only hashes are kept).")


@client_app.command("revoke")
def client_revoke(client_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a client: it gets no new tokens."""
    with client() as c:
        c.request("POST", f"/v1/clients/{seg(client_id)}/revoke")
    typer.echo(f"revoked client {client_id}")


# --- admin keys --------------------------------------------------------------------


@admin_key_app.command("create")
def admin_key_create(
    name: str,
    role: Annotated[str, typer.Option("--role", help="admin, operator or auditor.")] = "admin",
) -> None:
    """Create an admin API key; its token is printed once."""
    with client() as c:
        out = c.request("POST", "/v1/admin-keys", json={"name": name, "role": role})
    emit(out, lambda o: typer.echo(
        f"created {o['id']} ({o['role']}); its token, shown once:\nCREDGATE_TOKEN={o['token']}"))


crud.add_list(admin_key_app, "/v1/admin-keys", [
    ("ID", "id"), ("NAME", "name"), ("ROLE", "role"), ("STATE", _state),
], "List admin API keys.")


@admin_key_app.command("revoke")
def admin_key_revoke(key_id: Annotated[str, typer.Argument(metavar="KEY_ID")]) -> None:
    """Revoke an admin API key."""
    with client() as c:
        c.request("POST", f"/v1/admin-keys/{seg(key_id)}/revoke")
    typer.echo(f"revoked {key_id}")


# --- run tokens ----------------------------------------------------------------------

_RUN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise UsageProblem("a RUN_ID is 1-128 characters of A-Z a-z 0-9 . _ : -")
    return run_id


@run_app.command("token")
def run_token(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")],
    connector: Annotated[list[str], typer.Option("--connector", help="Connector (glob) the run may use (repeatable).")],
    resource: Annotated[list[str], typer.Option("--resource", help="Resource (glob) the run may use (repeatable).")],
    ttl: Annotated[str | None, typer.Option("--ttl", help="Token lifetime, e.g. 1h [default: 1h].")] = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="text (the token) or env (an export line for eval). JSON or YAML: -o json|yaml.")] = "text",
) -> None:
    """Mint a token for one pipeline run, scoped to a subset of your own rights."""
    _run_id(run_id)
    fmt = credential_format(fmt)
    body: dict[str, Any] = {"connectors": connector, "resources": resource}
    if ttl is not None:
        body["ttl_seconds"] = parse_duration(ttl)
    with client() as c:
        out = c.request("POST", f"/v1/runs/{seg(run_id)}/token", json=body)
    if fmt == "env":
        typer.echo(f"export CREDGATE_TOKEN={shlex.quote(out['token'])}")
    else:
        emit(out, lambda o: typer.echo(o["token"]))


@run_app.command("revoke")
def run_revoke(run_id: Annotated[str, typer.Argument(metavar="RUN_ID")]) -> None:
    """End a run: its token stops working and its leases are revoked."""
    _run_id(run_id)
    with client() as c:
        out = c.request("POST", f"/v1/runs/{seg(run_id)}/revoke")

    def human(o: dict[str, Any]) -> None:
        still = o["leases_still_revoking"]
        typer.echo(f"revoked run {run_id}; {o['leases_revoked']} lease(s) revoked"
                   + (f", {len(still)} still being retried by the reaper" if still else ""))

    emit(out, human)
