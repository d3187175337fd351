"""``credgate secret``: put, get, list, rm, restore."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import UsageProblem, client, group, parse_pairs, read_json_file, split_ref
from gateway.cli.output import details, emit, table
from gateway.client.urls import seg

app = group("Put, read, list and delete secrets.")

Ref = Annotated[str, typer.Argument(metavar="BACKEND/PATH")]


@app.command("put")
def secret_put(
    ref: Ref,
    pairs: Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", show_default=False)] = None,
    from_file: Annotated[Path | None, typer.Option("--from-file", help="JSON object of keys to values.")] = None,
    cas: Annotated[int | None, typer.Option("--cas", help="Write only if the current version is this.")] = None,
) -> None:
    """Write a new version of a secret."""
    backend, path = split_ref(ref)
    if bool(pairs) == bool(from_file):
        raise UsageProblem("give either KEY=VALUE pairs or --from-file FILE.json")
    data = read_json_file(from_file) if from_file else parse_pairs(pairs or [])
    body: dict[str, Any] = {"data": data}
    if cas is not None:
        body["cas"] = cas
    with client() as c:
        out = c.request("PUT", f"/v1/secrets/{seg(backend)}/{seg(path)}", json=body)
    emit(out, lambda o: typer.echo(f"wrote {backend}/{path} version {o['version']} ({', '.join(o['keys'])})"))


def _secret(out: dict[str, Any]) -> None:
    details(out, [
        ("secret", lambda o: f"{o['backend']}/{o['path']}"),
        ("version", lambda o: f"{o['version']} (current {o['current_version']})"),
        ("keys", "keys"),
        ("updated", "updated_at"),
    ])
    typer.echo("versions:")
    table(out["versions"], [("VERSION", "version"), ("CREATED", "created_at"), ("BY", "created_by")])
    if out.get("data") is not None:
        typer.echo("data:")
        for k, v in sorted(out["data"].items()):
            typer.echo(f"  {k}={v}")


@app.command("get")
def secret_get(
    ref: Ref,
    reveal: Annotated[bool, typer.Option("--reveal", help="Show the values.")] = False,
    version: Annotated[int | None, typer.Option("--version", min=1, help="A specific version.")] = None,
) -> None:
    """Show a secret's metadata (and its values with --reveal)."""
    backend, path = split_ref(ref)
    with client() as c:
        out = c.get(f"/v1/secrets/{seg(backend)}/{seg(path)}", reveal=reveal or None, version=version)
    emit(out, _secret)


@app.command("list")
def secret_list(
    prefix: Annotated[str, typer.Argument(metavar="[BACKEND[/PREFIX]]")] = "",
    deleted: Annotated[bool, typer.Option("--deleted", help="Include soft-deleted secrets.")] = False,
) -> None:
    """List secret paths (every backend when no prefix is given), one per line."""
    with client() as c:
        if prefix:
            backend, sub = split_ref(prefix, allow_bare_backend=True)
            backends = [backend]
        else:
            sub = ""
            backends = [b["name"] for b in c.get("/v1/backends")["items"]]
        found: list[str] = []
        for backend in backends:
            page_token = None
            while True:
                out = c.get(
                    f"/v1/secrets/{seg(backend)}",
                    prefix=sub or None,
                    page_token=page_token,
                    include_deleted=deleted or None,
                    limit=1000,
                )
                found.extend(f"{backend}/{p}" for p in out["items"])
                page_token = out["next_page_token"]
                if not page_token:
                    break
    emit(found, lambda refs: [typer.echo(ref) for ref in refs])


@app.command("rm")
def secret_rm(
    ref: Ref,
    destroy: Annotated[bool, typer.Option("--destroy", help="Destroy every version for good.")] = False,
) -> None:
    """Soft-delete a secret (recoverable with `secret restore`), or destroy it."""
    backend, path = split_ref(ref)
    with client() as c:
        c.request("DELETE", f"/v1/secrets/{seg(backend)}/{seg(path)}", params={"destroy": destroy or None})
    typer.echo(f"{'destroyed' if destroy else 'deleted'} {backend}/{path}")


@app.command("restore")
def secret_restore(ref: Ref) -> None:
    """Undo a soft delete."""
    backend, path = split_ref(ref)
    with client() as c:
        out = c.request("POST", f"/v1/secrets/{seg(backend)}/{seg(path)}:restore")
    emit(out, lambda o: typer.echo(f"restored {backend}/{path} at version {o['current_version']}"))
