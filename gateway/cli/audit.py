"""``credgate audit``: search, tail, export and verify the tamper-evident audit trail."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.common import UsageProblem, client, group
from gateway.cli.output import emit, emit_line

if TYPE_CHECKING:
    from gateway.client.http import Client


app = group("The tamper-evident audit trail.")


def _audit_line(e: dict[str, Any]) -> str:
    who = f"{e.get('issuer') or '-'}/{e.get('subject') or '-'}"
    extra = f" lease={e['lease_id']}" if e.get("lease_id") else ""
    return f"{e['seq']:>7} {e['time']} {e.get('decision') or '-':<5} {e.get('outcome') or '':<24} {who} {e.get('action') or '-'} {e.get('target')}{extra}"


def _audit_pages(c: Client, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    after = params.pop("after", None)
    while True:
        page = c.get("/v1/audit", **params, after=after, limit=1000)
        yield from page["items"]
        if not page["next_after"]:
            return
        after = page["next_after"]


AuditFilter = Annotated[str | None, typer.Option(help="Filter.")]


@app.command("search")
def audit_search(
    subject: AuditFilter = None,
    action: AuditFilter = None,
    connector: AuditFilter = None,
    lease: Annotated[str | None, typer.Option("--lease", help="A lease id.")] = None,
    decision: Annotated[str | None, typer.Option(help="allow or deny")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time, e.g. 2026-11-26T00:00:00Z")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time")] = None,
) -> None:
    """Find audit events."""
    params = dict(subject=subject, action=action, connector=connector, lease_id=lease, decision=decision,
                  since=since, until=until)
    with client() as c:
        for event in _audit_pages(c, params):
            emit_line(event, _audit_line)


@app.command("tail")
def audit_tail(
    n: Annotated[int, typer.Option("-n", min=1, max=1000, help="How many of the newest events.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
) -> None:
    """The newest audit events (and, with -f, those that follow)."""
    with client() as c:
        events = list(_audit_pages(c, {}))
        for event in events[-n:]:
            emit_line(event, _audit_line)
        after = events[-1]["seq"] if events else 0
        while follow:
            time.sleep(1)
            for event in _audit_pages(c, {"after": after}):
                after = event["seq"]
                emit_line(event, _audit_line)


@app.command("export")
def audit_export(
    since: Annotated[str | None, typer.Option(help="ISO time")] = None,
) -> None:
    """Every event as JSON lines (with its hash chain fields), for archiving or offline checks."""
    with client() as c:
        for event in _audit_pages(c, {"since": since}):
            typer.echo(json.dumps(event, sort_keys=True))


AGAINST_CHECKPOINTS = 500  # the newest checkpoint lines of --against FILE that are sent
AGAINST_EVENTS = 100  # and the newest event lines
_EVENT_LINE_FIELDS = ("seq", "time", "request_id", "issuer", "subject", "action", "target", "decision", "rule",
                      "outcome", "lease_id", "client_addr", "details", "prev_hash", "hash")


def _against_lines(path: Path) -> dict[str, Any]:
    """The newest checkpoint and event lines of an audit sink file (its last 8 MiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - 8 * 1024 * 1024))
            lines = f.read().splitlines()
    except OSError as exc:
        raise UsageProblem(f"can't read {path}: {exc.strerror or type(exc).__name__}") from None
    if end > 8 * 1024 * 1024 and lines:
        lines = lines[1:]  # the first one may be cut
    checkpoints, events = [], []
    for line in lines:  # the line shapes of gateway/audit/trail.py (not imported: the CLI runs without the server)
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("type") == "audit-checkpoint":
            checkpoints.append(item)
        elif isinstance(item, dict) and "seq" in item and "hash" in item:
            events.append({k: item.get(k) for k in _EVENT_LINE_FIELDS if k in item})
    if not checkpoints and not events:
        raise UsageProblem(f"{path} holds no audit lines (is it a file sink of this gateway?)")
    return {"source": str(path.name)[:200], "checkpoints": checkpoints[-AGAINST_CHECKPOINTS:],
            "events": events[-AGAINST_EVENTS:]}


@app.command("verify")
def audit_verify(
    against: Annotated[Path | None, typer.Option(
        "--against", help="An audit sink file (type file): its newest checkpoints and events must match the store, "
                          "so a tail deleted from the store with its checkpoints is found.",
        show_default=False)] = None,
    full: Annotated[bool, typer.Option(
        "--full", help="Walk the whole chain (always so with --against); by default the walk starts after the "
                       "last checkpoint an earlier verification found clean.")] = False,
) -> None:
    """Check the keyed chain and its checkpoints; exit 1 and name every bad, missing or uncovered event."""
    body = _against_lines(against) if against is not None else None
    with client() as c:
        out = (c.get("/v1/audit/verify", params={"full": "true"} if full else None) if body is None
               else c.request("POST", "/v1/audit/verify", json=body))
    def human(o: dict[str, Any]) -> None:
        if o["ok"]:
            compared = o.get("compared") or {}
            extra = (f", matches {compared.get('checkpoints', 0)} checkpoint(s) and {compared.get('events', 0)} event(s) "
                     f"of {against.name}") if against is not None else ""
            walked = (f" (incremental: walked {o.get('walked', 0)} from event {o.get('from_seq')}, the earlier ones "
                      f"verified before; --full walks them all)") if o.get("incremental") else ""
            typer.echo(f"ok: {o['events']} events, {o['checkpoints']} checkpoint(s), "
                       f"covered to event {o.get('covered_to', o['events'])}{extra}{walked}")
        else:
            typer.echo(f"BROKEN: first bad event {o['first_bad_seq']}: {o['problem']}")
            for p in o.get("problems", [])[1:]:
                typer.echo(f"  also event {p['seq']}: {p['problem']}")

    emit(out, human)
    if not out["ok"]:
        raise typer.Exit(1)




@app.command("prune")
def audit_prune(
    before: Annotated[str, typer.Option("--before", help="ISO date or time: events recorded before it are pruned, "
                                                          "e.g. 2026-10-01 or 2026-10-01T00:00:00Z.")],
    archive: Annotated[Path, typer.Option("--archive", help="Where the pruned events are written first "
                                                            "(JSON lines, the export format); must not exist.",
                                          dir_okay=False)],
    config: Annotated[Path | None, typer.Option("--config", help="YAML settings file.", dir_okay=False)] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")] = None,
    dev: Annotated[bool, typer.Option("--dev", help="The store and KEK of `credgate serve --dev`.")] = False,
) -> None:
    """Retention: archive the events before --before to --archive, then delete them from the store.

    Server-side (reads the settings and opens the store; on SQLite, stop the gateway first).
    The chain must verify first; the prune is recorded (fail-closed) in the chain with the cut
    and an anchor checkpoint, so `credgate audit verify` proves the chain from the cut on and
    `credgate audit verify --against ARCHIVE` checks the archive's newest lines against it."""
    from datetime import datetime, timezone

    from gateway.cli.common import server_code

    with server_code("audit prune"):
        import asyncio

        from gateway.audit.trail import AuditUnavailable
        from gateway.runtime import Runtime
        from gateway.settings import load_settings

    try:
        cut = datetime.fromisoformat(before.replace("Z", "+00:00"))
    except ValueError:
        raise UsageProblem(f"--before {before!r} is not an ISO date or time") from None
    if cut.tzinfo is None:
        cut = cut.replace(tzinfo=timezone.utc)
    if archive.exists():
        raise UsageProblem(f"{archive} exists; name a new archive file")
    settings = load_settings(config, dev=dev or None, data_dir=data_dir).model_copy(update={"reaper_enabled": False})

    async def run() -> dict[str, Any]:
        rt = await Runtime.start(settings)
        try:
            return await rt.audit.prune(cut, archive)
        finally:
            await rt.aclose()

    try:
        out = asyncio.run(run())
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    except AuditUnavailable:
        raise UsageProblem("the prune could not be recorded in the audit trail (a required sink or the store is "
                           "down); nothing was deleted") from None
    emit(out, lambda o: typer.echo(f"pruned {o['pruned']} events (through event {o['pruned_through']})"
                                   + (f" into {o['archive']}" if o.get("archive") else "")))
