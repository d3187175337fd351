"""``credgate backend``: register, list, check and remove secret backends."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli import crud
from gateway.cli.common import client, group, parse_pairs, read_json_file
from gateway.cli.output import details, emit
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


# Health.problem (backends/base.py) in words.
PROBLEMS = {
    "unreachable": "unreachable: the store did not answer",
    "auth_refused": "auth refused: the store refused the backend's credentials",
    "permission_missing": "permission missing",
    "expiring": "credentials expiring: they run out soon and can't be renewed",
    "misconfigured": "misconfigured",
}


def diagnosis(o: dict[str, Any]) -> str:
    """One line that says what is wrong (``permission missing for write``), or ``ok``."""
    if o["ok"]:
        return "ok"
    problem = o.get("problem")
    words = PROBLEMS.get(problem or "", problem or "failed")
    if problem == "permission_missing":
        denied = [op for op in ("list", "read", "write", "delete") if o.get("details", {}).get(op, "ok") != "ok"]
        if denied:
            words += " for " + "/".join(denied)
    return words


@app.command("check")
def backend_check(name: str) -> None:
    """Check a backend now: reachable, credentials accepted, list/read/write allowed. Exit 1 if not."""
    with client() as c:
        out = c.request("POST", f"/v1/backends/{seg(name)}/check")

    def human(o: dict[str, Any]) -> None:
        if o["ok"]:
            typer.echo(f"{name}: ok: {o['message']}")
        else:
            typer.echo(f"{name}: FAILED: {diagnosis(o)} ({o['message']})")
        for key, value in sorted(o.get("details", {}).items()):
            typer.echo(f"  {key}: {value}")

    emit(out, human)
    if not out["ok"]:
        raise typer.Exit(1)


def _show(o: dict[str, Any]) -> None:
    details(o, [("backend", "name"), ("type", "type"), ("built-in", "builtin"), ("config", "config"),
                ("capabilities", lambda b: ", ".join(k for k, v in (b.get("capabilities") or {}).items() if v is True)
                 or None)])
    health = o.get("health") or {}
    for label, key in (("status", "status"), ("last check", "last_check")):
        h = health.get(key)
        if h is None:
            typer.echo(f"{label}: -" + (" (not started on this replica)" if key == "status" else " (none on this replica)"))
        else:
            when = f" at {h['checked_at']}" if h.get("checked_at") else ""
            typer.echo(f"{label}: {diagnosis(h)}{when} ({h['message']})")


crud.add_show(app, "/v1/backends", "Show a backend: its settings (secrets masked), capabilities and health as last known.",
              human=_show)


crud.add_rm(app, "/v1/backends", "backend", "Remove a backend (refused while it holds secrets).")
