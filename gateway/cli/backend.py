"""``credgate backend``: register, list, check and remove secret backends."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli import crud
from gateway.cli.common import client, group, parse_pairs, read_json_file
from gateway.cli.output import emit
from gateway.client.urls import seg

app = group("Register and check secret backends.")

crud.add_list(app, "/v1/backends", [("NAME", "name"), ("TYPE", "type"), ("BUILT-IN", "builtin")],
              "List registered backends.")


@app.command("add")
def backend_add(
    name: str,
    type_: Annotated[str, typer.Option("--type", help="Backend type, e.g. local.")],
    settings: Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", show_default=False)] = None,
    config_file: Annotated[Path | None, typer.Option("--config-file", help="JSON object of settings.")] = None,
) -> None:
    """Register (or replace) a backend."""
    config = read_json_file(config_file) if config_file else parse_pairs(settings or [], json_values=True)
    with client() as c:
        out = c.request("PUT", f"/v1/backends/{seg(name)}", json={"type": type_, "config": config})
    emit(out, lambda o: typer.echo(f"backend {o['name']} ({o['type']}) saved"))


@app.command("check")
def backend_check(name: str) -> None:
    """Check that a backend is reachable; exit 1 if not."""
    with client() as c:
        out = c.request("POST", f"/v1/backends/{seg(name)}/check")
    emit(out, lambda o: typer.echo(f"{name}: {'ok' if o['ok'] else 'FAILED'}: {o['message']}"))
    if not out["ok"]:
        raise typer.Exit(1)


crud.add_rm(app, "/v1/backends", "backend", "Remove a backend (refused while it holds secrets).")
