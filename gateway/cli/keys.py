"""``credgate keys``: the key-encryption key (generate a file, rotate, status) and the
token-signing key."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import client, group, server_code
from gateway.cli.output import details, emit, machine, table

app = group("The key-encryption key (KEK): generate, rotate, status; the token-signing key.")


@app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", help="Where to write the new KEK file (mode 0600).")],
) -> None:
    """Create a new KEK file with one fresh version."""
    with server_code("keys generate"):
        from gateway.crypto.keyring import new_key_file

    new_key_file(out)
    typer.echo(f"wrote {out}; start the gateway with CREDGATE_KEK_FILE={out}")


def _key_status(out: dict[str, Any]) -> None:
    details(out, [
        ("source", "source"),
        ("current version", "current_version"),
        ("re-wrap pending", lambda o: f"{o['rewrap_pending']}{' (rotating)' if o['rotating'] else ''}"),
    ])
    typer.echo("versions:")
    table(out["versions"], [
        ("VERSION", "version"), ("STATE", "state"), ("REFS", "references"), ("FINGERPRINT", "fingerprint"),
        ("", lambda v: "nothing references it; it may be removed from the KEK file" if v["state"] == "retired" else ""),
    ])


@app.command("status")
def keys_status() -> None:
    """KEK versions and what references each."""
    with client() as c:
        out = c.get("/v1/keys/status")
    emit(out, _key_status)


@app.command("rotate")
def keys_rotate(
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until every data key is re-wrapped.")] = True,
) -> None:
    """Add a KEK version and re-wrap every data key under it, while the gateway serves."""
    with client() as c:
        out = c.request("POST", "/v1/keys/rotate")
        if not machine():
            typer.echo(f"KEK version {out['current_version']} is current; re-wrapping {out['rewrap_pending']} data key(s)")
        while wait and (out["rotating"] or out["rewrap_pending"]):
            time.sleep(0.2)
            out = c.get("/v1/keys/status")
    emit(out, _key_status)


@app.command("rotate-signing")
def keys_rotate_signing(
    grace: Annotated[int, typer.Option(
        "--grace", min=0, max=86400,
        help="Seconds the old key keeps verifying the tokens it signed (a planned rotation). "
        "Default 0: they are refused at once (a rotation after a compromise).")] = 0,
) -> None:
    """A new token-signing key; tokens signed by the old one are refused at once, or after --grace."""
    with client() as c:
        out = c.request("POST", "/v1/keys/signing/rotate", json={"grace_seconds": grace})
    if grace:
        emit(out, lambda o: typer.echo(
            f"signing key {o['active_kid']} is active; the old key verifies tokens for {grace} more second(s)"))
    else:
        emit(out, lambda o: typer.echo(
            f"signing key {o['active_kid']} is active; tokens signed by any other key are refused"))
