"""``credgate policy``: put, list, show, rm, explain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli import crud
from gateway.cli.common import UsageProblem, client, group, key_values
from gateway.cli.output import emit
from gateway.client.urls import seg

app = group("Policies: who may do what, and why a request is allowed or denied.")


@app.command("put")
def policy_put(
    name: str,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The policy document: YAML, or JSON if it ends in .json.")],
) -> None:
    """Create or replace a policy from a YAML or JSON file."""
    try:
        content = file.read_bytes()
    except OSError as exc:
        raise UsageProblem(f"can't read {file}: {exc.strerror}") from None
    media = "application/json" if file.suffix.lower() == ".json" else "application/yaml"
    with client() as c:
        out = c.request("PUT", f"/v1/policies/{seg(name)}", content=content, headers={"Content-Type": media})
    emit(out, lambda o: typer.echo(f"policy {o['name']} saved ({len(o['document'].get('rules', []))} rule(s))"))


def _document(out: dict[str, Any]) -> None:
    import yaml

    typer.echo(f"# policy {out['name']}, updated {out['updated_at']}")
    typer.echo(yaml.safe_dump(out["document"], sort_keys=False).rstrip("\n"))


crud.add_list(app, "/v1/policies", [
    ("NAME", "name"), ("RULES", lambda p: len(p["document"].get("rules", []))), ("UPDATED", "updated_at"),
    ("DESCRIPTION", lambda p: p["document"].get("description")),
], "List policies.")
crud.add_show(app, "/v1/policies", "Show a policy document (as YAML; -o json for the raw response).", human=_document)
crud.add_rm(app, "/v1/policies", "policy", "Remove a policy.")


@app.command("explain")
def policy_explain(
    subject: Annotated[str, typer.Option("--subject", help="e.g. alice, system:serviceaccount:ml:trainer, client:zenml.")],
    action: Annotated[str, typer.Option("--action", help="e.g. credentials:issue, secrets:reveal.")],
    issuer: Annotated[str, typer.Option("--issuer", help="Trusted issuer name; 'credgate' for keys, clients, runs.")] = "credgate",
    role: Annotated[list[str] | None, typer.Option("--role", help="A role the principal holds (repeatable).")] = None,
    claim: Annotated[list[str] | None, typer.Option("--claim", help="NAME=VALUE; repeat a name for a list (groups).")] = None,
    connector: Annotated[str | None, typer.Option("--connector")] = None,
    resource: Annotated[str | None, typer.Option("--resource")] = None,
) -> None:
    """Would this principal be allowed this action? Prints allow or deny, the rule and the reason;
    exits 1 on deny (like a failed check), so a script can branch on the answer."""
    claims: dict[str, Any] = {}
    for key, value in key_values(claim or [], "--claim", "groups=ml-team"):
        if key in claims:
            claims[key] = (claims[key] if isinstance(claims[key], list) else [claims[key]]) + [value]
        else:
            claims[key] = value
    body = {
        "principal": {"issuer": issuer, "subject": subject, "roles": role or [], "claims": claims},
        "action": action, "connector": connector, "resource": resource,
    }
    with client() as c:
        out = c.request("POST", "/v1/policies/explain", json=body)

    def human(o: dict[str, Any]) -> None:
        typer.echo(o["decision"])
        typer.echo(f"rule:    {o['rule'] or '-'}")
        typer.echo(f"reason:  {o['reason']}")
        if o.get("max_ttl_seconds") is not None:
            typer.echo(f"max ttl: {o['max_ttl_seconds']}s")

    emit(out, human)
    if out["decision"] != "allow":
        raise typer.Exit(1)
