"""``credgate secret``: put, get, list, rm, restore, migrate (its engine: :mod:`gateway.cli.migrate`)."""

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


@app.command("migrate")
def secret_migrate(
    from_: Annotated[str, typer.Option("--from", metavar="BACKEND[/PREFIX]", help="Copy the secrets under this folder.")],
    to: Annotated[str, typer.Option("--to", metavar="BACKEND[/PREFIX]", help="To the same paths under this folder.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compare and say what would be copied; write nothing.")] = False,
    all_versions: Annotated[bool, typer.Option(
        "--all-versions", help="Copy every readable version, oldest first (default: the current version only).")] = False,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Where to write the JSON report [default: ./credgate-migrate-<UTC time>.json].",
        show_default=False)] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=32, help="Secrets copied at once.")] = 8,
) -> None:
    """Copy every secret under --from to --to through the gateway, verify each copy by reading it
    back, and write a report. Never deletes from the source. Interrupted (Ctrl-C, killed)? Run the
    same command again: secrets already copied are compared and skipped, never written twice.
    Needs secrets:read+reveal on the source and secrets:read+reveal+write on the destination.
    Exit 0 when every secret is verified, 1 when some failed (listed), 2 on bad input.
    Re-point connectors afterwards with `credgate connector repoint`."""
    import threading
    from datetime import UTC, datetime

    from gateway.cli import migrate as m
    from gateway.client.errors import RequestFailed

    src, dst = m.parse_location(from_, "--from"), m.parse_location(to, "--to")
    m.check_apart(src, dst)
    path = (report or m.default_report_path()).absolute()
    if path.is_dir() or not path.parent.is_dir():
        raise UsageProblem(f"--report {path}: not a file in an existing directory")
    stop = threading.Event()
    with client() as c:
        api = m.Api(c.addr, c.token, stop)
    src_info, dst_info = api.backend(src.backend), api.backend(dst.backend)
    caps = dst_info.get("capabilities") or {}
    if caps.get("read_only"):
        raise UsageProblem(f"backend {dst.backend!r} is read-only through credgate; choose another --to")
    if all_versions:
        for info in (src_info, dst_info):
            if (info.get("capabilities") or {}).get("versions") is False:
                raise UsageProblem(f"backend {info['name']!r} keeps no versions; migrate without --all-versions")
    opts = m.Options(src, dst, all_versions=all_versions, dry_run=dry_run,
                     cas=bool(caps.get("check_and_set")), dst_versions=caps.get("versions") is not False)
    rels = api.list_all(src)
    try:  # what is already there: secrets absent from it are written without a read first
        present: set[str] | None = set(api.list_all(dst)) if rels else set()
    except RequestFailed as exc:
        if exc.status != 403:
            raise
        present = None  # may not list the destination: read each secret there instead
    head = {"from": str(src), "to": str(dst), "dry_run": dry_run, "all_versions": all_versions,
            "started_at": datetime.now(UTC).isoformat()}
    rep = m.Report(path, head)
    typer.echo(f"{'dry run: ' if dry_run else ''}{len(rels)} secret(s) under {src} -> {dst}; report: {path}", err=True)
    result = m.migrate(api, opts, rels, rep, concurrency, present)
    _migrate_summary(result, src, dst, path, dry_run)


def _migrate_summary(result: Any, src: Any, dst: Any, path: Path, dry_run: bool) -> None:
    from gateway.client.errors import GatewayUnreachable, RequestFailed

    totals = result.report.totals()
    failed = [o for o in result.report.outcomes.values() if o.status == "failed"]
    summary = {"from": str(src), "to": str(dst), "report": str(path), "dry_run": dry_run, "totals": totals,
               "interrupted": result.interrupted,
               "failed": [{"source": o.source, "destination": o.destination, **(o.error or {})} for o in failed]}

    def human(s: dict[str, Any]) -> None:
        n = totals.get
        if dry_run:
            typer.echo(f"dry run {src} -> {dst}: {n('secrets')} secret(s): {n('would_copy', 0)} to copy "
                       f"({n('versions_copied', 0)} version(s)), {n('would_skip', 0)} already there, "
                       f"{n('failed', 0)} failed; nothing written (report: {path})")
        else:
            typer.echo(f"migrated {src} -> {dst}: {n('secrets')} secret(s): {n('copied', 0)} copied "
                       f"({n('versions_copied', 0)} version(s)), {n('skipped', 0)} already there, "
                       f"{n('failed', 0)} failed, {n('verified', 0)} verified (report: {path})")
        for f in s["failed"][:50]:
            typer.echo(f"  failed: {f['source']} -> {f['destination']}: {f['code']}: {f['message']}")
        if len(s["failed"]) > 50:
            typer.echo(f"  ... and {len(s['failed']) - 50} more (see the report)")

    if isinstance(result.fatal, GatewayUnreachable):
        raise GatewayUnreachable(f"{result.fatal} (stopped; run the same command again to resume; report: {path})")
    if result.fatal is not None:
        again = " run the same command again to resume;" if result.fatal.status in (429, 503, 504) else ""
        raise RequestFailed(result.fatal.status, result.fatal.code,
                            f"{result.fatal.message} (stopped: no further secret was started;{again} report: {path})")
    if result.interrupted:
        left = totals.get("not_done", 0)
        typer.echo(f"credgate: interrupted with {left} secret(s) not done; run the same command again to resume "
                   f"(report: {path})", err=True)
        raise typer.Exit(130)
    emit(summary, human)
    if failed or totals.get("not_done"):
        raise typer.Exit(1)
