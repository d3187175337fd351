"""``credgate connector``: types, add, list, show, verify, resources, rm, repoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli import crud
from gateway.cli.common import UsageProblem, client, group, parse_duration, parse_pairs, read_json_file, split_ref
from gateway.cli.output import emit, table
from gateway.client.urls import seg

app = group("Connectors: routes from backend secrets to target services.")


def _types(out: dict[str, Any]) -> None:
    table(out["items"], [
        ("TYPE", "type"),
        ("AUTH METHODS", lambda t: t["auth_methods"] if t["available"] else f"unavailable: {t['reason']}"),
        ("RESOURCES", lambda t: t.get("resource_types")),
        ("REVOCABILITY", lambda t: t.get("revocability")),
        ("RENEWABLE", lambda t: t.get("renewable")),
        ("WRAP ONLY", lambda t: t.get("wrap_only")),
        ("TTL", lambda t: f"{t['min_ttl_seconds']}s..{t['max_ttl_seconds']}s (default {t['default_ttl_seconds']}s)"
         if t["available"] else None),
    ])


@app.command("types")
def connector_types() -> None:
    """Connector types, their auth methods, resources and revocability."""
    with client() as c:
        out = c.get("/v1/connector-types")
    emit(out, _types)


@app.command("add")
def connector_add(
    name: str,
    type_: Annotated[str, typer.Option("--type", help="Connector type (see `credgate connector types`).")],
    auth_method: Annotated[str, typer.Option("--auth-method", help="One of the type's auth methods.")],
    resource: Annotated[list[str], typer.Option("--resource", help="Allowed resource pattern (repeatable).")],
    secret: Annotated[str | None, typer.Option("--secret", help="BACKEND/PATH of the secret holding the material (none for web-identity).")] = None,
    settings: Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", show_default=False)] = None,
    config_file: Annotated[Path | None, typer.Option("--config-file", help="JSON object of settings.")] = None,
    default_ttl: Annotated[str | None, typer.Option("--default-ttl", help="e.g. 15m")] = None,
    max_ttl: Annotated[str | None, typer.Option("--max-ttl", help="e.g. 1h")] = None,
) -> None:
    """Register (or replace) a connector."""
    if secret is not None:
        split_ref(secret)
    config = read_json_file(config_file) if config_file else parse_pairs(settings or [], json_values=True)
    body = {
        "type": type_, "auth_method": auth_method, "secret": secret, "config": config, "resources": resource,
        "default_ttl_seconds": parse_duration(default_ttl), "max_ttl_seconds": parse_duration(max_ttl),
    }
    with client() as c:
        out = c.request("PUT", f"/v1/connectors/{seg(name)}", json=body)
    emit(out, lambda o: typer.echo(f"connector {o['name']} ({o['type']}) saved"))


crud.add_list(app, "/v1/connectors", [
    ("NAME", "name"), ("TYPE", "type"), ("AUTH", "auth_method"), ("SECRET", "secret"), ("HOLDS SECRET", "holds_secret"),
    ("RESOURCES", "resources"),
], "List connectors.")
crud.add_show(app, "/v1/connectors", "Show a connector (never its material).")


@app.command("verify")
def connector_verify(name: str) -> None:
    """Check the connector's material against its target; exit 1 if it fails."""
    with client() as c:
        out = c.request("POST", f"/v1/connectors/{seg(name)}/verify")

    def human(o: dict[str, Any]) -> None:
        typer.echo(f"{name}: {'ok' if o['ok'] else 'FAILED'}: {o['message']}")
        if o.get("identity"):
            typer.echo(f"identity: {o['identity']}")
        for rtype, items in o["reachable"].items():
            typer.echo(f"{rtype}: {', '.join(items) or '-'}")

    emit(out, human)
    if not out["ok"]:
        raise typer.Exit(1)


@app.command("resources")
def connector_resources(
    name: str,
    type_: Annotated[str, typer.Option("--type", help="Resource type, e.g. database, schema, s3-bucket.")],
) -> None:
    """List resources of one type that the connector can see, one per line."""
    with client() as c:
        out = c.get(f"/v1/connectors/{seg(name)}/resources", type=type_)
    emit(out, lambda o: [typer.echo(r) for r in o["items"]])


@app.command("rm")
def connector_rm(
    name: str,
    revoke_leases: Annotated[bool, typer.Option("--revoke-leases", help="Revoke its live leases first.")] = False,
) -> None:
    """Remove a connector (refused while it has live leases, unless --revoke-leases)."""
    crud.remove("/v1/connectors", "connector", name, params={"revoke_leases": revoke_leases or None})


@app.command("repoint")
def connector_repoint(
    from_: Annotated[str, typer.Option("--from", metavar="BACKEND[/PREFIX]", help="Connectors drawing on secrets here...")],
    to: Annotated[str, typer.Option("--to", metavar="BACKEND[/PREFIX]", help="...draw on the same paths here.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say which connectors would change; change none.")] = False,
) -> None:
    """Re-point every connector whose secret lies under --from to the same path under --to (after
    `credgate secret migrate`). Each is replaced through the API, so the gateway checks
    connectors:manage on it, secrets:bind on its new secret, and that the new secret holds what
    the connector needs. Exit 1 if any connector could not be re-pointed (listed)."""
    from gateway.cli import migrate as m

    src, dst = m.parse_location(from_, "--from"), m.parse_location(to, "--to")
    if src == dst:
        raise UsageProblem("--from and --to are the same place")
    with client() as c:
        results = m.repoint(c, src, dst, dry_run)

    def human(items: list[dict[str, Any]]) -> None:
        if not items:
            typer.echo(f"no connector draws on a secret under {src}")
        for r in items:
            what = {"repointed": "repointed", "would_repoint": "would repoint", "failed": "FAILED"}[r["status"]]
            why = f": {r['error']['code']}: {r['error']['message']}" if r["error"] else ""
            typer.echo(f"{what} {r['connector']}: {r['from']} -> {r['to']}{why}")

    emit(results, human)
    if any(r["status"] == "failed" for r in results):
        raise typer.Exit(1)
