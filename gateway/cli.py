"""The ``credgate`` command.

Server-side commands (``serve``, ``db upgrade``, ``keys generate``) read the
settings; client commands talk to a running gateway over HTTP with
``CREDGATE_ADDR`` and ``CREDGATE_TOKEN`` (or ``--addr``/``--token``).

``credgate login`` signs an admin in through the identity provider the gateway
names (OAuth2 device flow, RFC 8628), exchanges the IdP's id_token for a
gateway token and keeps it in a profile file (``$CREDGATE_PROFILE``, default
``~/.config/credgate/profile.json``, mode 0600). Without ``--token`` and
``CREDGATE_TOKEN``, client commands use that token, but only towards the
gateway it was issued by.

Exit codes: 0 success, 1 a request the gateway refused or could not serve,
2 bad usage or configuration (always one line on stderr).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from gateway import paths
from gateway.client import DEFAULT_ADDR, Client, GatewayUnreachable, RequestFailed, seg
from gateway.errors import BadRequest, ConfigurationError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as click_exc  # type: ignore[no-redef]

app = typer.Typer(
    name="credgate",
    help="credgate: a secrets and service-connector gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
secret_app = typer.Typer(help="Put, read, list and delete secrets.", no_args_is_help=True)
backend_app = typer.Typer(help="Register and check secret backends.", no_args_is_help=True)
keys_app = typer.Typer(help="The key-encryption key (KEK): generate, rotate, status.", no_args_is_help=True)
admin_key_app = typer.Typer(help="Admin API keys.", no_args_is_help=True)
db_app = typer.Typer(help="The gateway's store.", no_args_is_help=True)
connector_app = typer.Typer(help="Connectors: routes from backend secrets to target services.", no_args_is_help=True)
cred_app = typer.Typer(help="Issue short-lived credentials.", no_args_is_help=True)
lease_app = typer.Typer(help="Leases: every credential issued, renewed, revoked.", no_args_is_help=True)
issuer_app = typer.Typer(help="Trusted issuers: identity providers whose JWTs the gateway accepts.", no_args_is_help=True)
client_app = typer.Typer(help="OAuth2 clients: services that get gateway tokens.", no_args_is_help=True)
policy_app = typer.Typer(help="Policies: who may do what, and why a request is allowed or denied.", no_args_is_help=True)
run_app = typer.Typer(help="Run tokens: a subset of your rights for one pipeline run.", no_args_is_help=True)
app.add_typer(secret_app, name="secret")
app.add_typer(backend_app, name="backend")
app.add_typer(keys_app, name="keys")
app.add_typer(admin_key_app, name="admin-key")
app.add_typer(db_app, name="db")
app.add_typer(connector_app, name="connector")
app.add_typer(cred_app, name="cred")
app.add_typer(lease_app, name="lease")
app.add_typer(issuer_app, name="issuer")
app.add_typer(client_app, name="client")
app.add_typer(policy_app, name="policy")
app.add_typer(run_app, name="run")


class UsageProblem(Exception):
    """Bad input detected by the CLI itself: exit 2."""


Addr = Annotated[str | None, typer.Option("--addr", envvar="CREDGATE_ADDR", help="Gateway URL.", show_default=False)]
Token = Annotated[
    str | None, typer.Option("--token", envvar="CREDGATE_TOKEN", help="Bearer token.", show_default=False)
]
Json = Annotated[bool, typer.Option("--json", help="Print the raw JSON response.")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file.", exists=False, dir_okay=False)
]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")]


def _client(addr: str | None, token: str | None) -> Client:
    """A client for ``addr`` with ``token`` (flag, then CREDGATE_TOKEN); failing both,
    the token ``credgate login`` stored, if it was issued by that same gateway."""
    if token is None:
        addr, token = _profile_token(addr)
    return Client(addr, token)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def _split_ref(ref: str, *, allow_bare_backend: bool = False) -> tuple[str, str]:
    backend, _, path = ref.partition("/")
    try:
        paths.backend_name(backend)
        if path or not allow_bare_backend:
            paths.secret_path(path) if not allow_bare_backend else paths.secret_prefix(path)
    except BadRequest as exc:
        raise UsageProblem(f"{exc.message} (expected BACKEND/PATH, e.g. local/app/db)") from None
    return backend, path


# --- serve and server-side commands -----------------------------------------


@app.command()
def serve(
    dev: Annotated[bool, typer.Option("--dev", help="Development mode: create data dir, KEK and admin token.")] = False,
    config: ConfigFile = None,
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port [default: 8765].")] = None,
) -> None:
    """Run the gateway."""
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import configure
    from gateway.runtime import keyring_for
    from gateway.settings import load_settings

    settings = load_settings(config, dev=dev or None, data_dir=data_dir, host=host, port=port)
    configure(settings.log_format, settings.log_level)
    keyring_for(settings)  # fail fast, with one line, before the server starts
    if settings.dev:
        typer.echo(f"credgate dev mode: data in {settings.data_dir}, listening on http://{settings.host}:{settings.port}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=10,
        server_header=False,
    )


@db_app.command("upgrade")
def db_upgrade(config: ConfigFile = None, data_dir: DataDir = None) -> None:
    """Apply the store's migrations up to the newest."""
    from gateway.settings import load_settings
    from gateway.store.database import sync_url
    from gateway.store.migrate import current, upgrade

    settings = load_settings(config, data_dir=data_dir)
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    url = sync_url(settings.store_url)
    upgrade(url)
    typer.echo(f"store at revision {current(url)}")


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", help="Where to write the new KEK file (mode 0600).")],
) -> None:
    """Create a new KEK file with one fresh version."""
    from gateway.keyring import new_key_file

    new_key_file(out)
    typer.echo(f"wrote {out}; start the gateway with CREDGATE_KEK_FILE={out}")


# --- secrets ----------------------------------------------------------------


def _parse_pairs(pairs: list[str], *, json_values: bool = False) -> dict[str, Any]:
    """KEY=VALUE pairs; KEY=@FILE reads a file. With ``json_values`` (settings, not
    secrets), a value starting with '[' or '{' is parsed as JSON."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageProblem("each value must be KEY=VALUE (or KEY=@FILE to read the value from a file)")
        if value.startswith("@"):
            try:
                value = Path(value[1:]).read_text()
            except OSError as exc:
                raise UsageProblem(f"can't read {value[1:]}: {exc.strerror}") from None
        if json_values and value[:1] in ("[", "{"):
            try:
                data[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                raise UsageProblem(f"the value of {key} starts like JSON but is not valid JSON") from None
        data[key] = value
    return data


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UsageProblem(f"can't read {path}: {exc.strerror}") from None
    except json.JSONDecodeError:
        raise UsageProblem(f"{path} is not valid JSON") from None
    if isinstance(raw, dict) and set(raw) == {"data"} and isinstance(raw["data"], dict):
        raw = raw["data"]
    if not isinstance(raw, dict):
        raise UsageProblem(f"{path} must hold a JSON object of string keys to string values")
    return raw


@secret_app.command("put")
def secret_put(
    ref: Annotated[str, typer.Argument(metavar="BACKEND/PATH")],
    pairs: Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", show_default=False)] = None,
    from_file: Annotated[Path | None, typer.Option("--from-file", help="JSON object of keys to values.")] = None,
    cas: Annotated[int | None, typer.Option("--cas", help="Write only if the current version is this.")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Write a new version of a secret."""
    backend, path = _split_ref(ref)
    if bool(pairs) == bool(from_file):
        raise UsageProblem("give either KEY=VALUE pairs or --from-file FILE.json")
    data = _read_json_file(from_file) if from_file else _parse_pairs(pairs or [])
    body: dict[str, Any] = {"data": data}
    if cas is not None:
        body["cas"] = cas
    with _client(addr, token) as c:
        out = c.request("PUT", f"/v1/secrets/{seg(backend)}/{seg(path)}", json=body)
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"wrote {backend}/{path} version {out['version']} ({', '.join(out['keys'])})")


@secret_app.command("get")
def secret_get(
    ref: Annotated[str, typer.Argument(metavar="BACKEND/PATH")],
    reveal: Annotated[bool, typer.Option("--reveal", help="Show the values.")] = False,
    version: Annotated[int | None, typer.Option("--version", min=1, help="A specific version.")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Show a secret's metadata (and its values with --reveal)."""
    backend, path = _split_ref(ref)
    with _client(addr, token) as c:
        out = c.get(f"/v1/secrets/{seg(backend)}/{seg(path)}", reveal=reveal or None, version=version)
    if as_json:
        _print_json(out)
        return
    typer.echo(f"secret:   {out['backend']}/{out['path']}")
    typer.echo(f"version:  {out['version']} (current {out['current_version']})")
    typer.echo(f"keys:     {', '.join(out['keys'])}")
    typer.echo(f"updated:  {out['updated_at']}")
    typer.echo("versions:")
    for v in out["versions"]:
        typer.echo(f"  {v['version']:>4}  {v['created_at']}  {v['created_by'] or '-'}")
    if out.get("data") is not None:
        typer.echo("data:")
        for k, v in sorted(out["data"].items()):
            typer.echo(f"  {k}={v}")


@secret_app.command("list")
def secret_list(
    prefix: Annotated[str, typer.Argument(metavar="[BACKEND[/PREFIX]]")] = "",
    deleted: Annotated[bool, typer.Option("--deleted", help="Include soft-deleted secrets.")] = False,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """List secret paths (every backend when no prefix is given)."""
    with _client(addr, token) as c:
        if prefix:
            backend, sub = _split_ref(prefix, allow_bare_backend=True)
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
    if as_json:
        _print_json(found)
    else:
        for ref in found:
            typer.echo(ref)


@secret_app.command("rm")
def secret_rm(
    ref: Annotated[str, typer.Argument(metavar="BACKEND/PATH")],
    destroy: Annotated[bool, typer.Option("--destroy", help="Destroy every version for good.")] = False,
    addr: Addr = None,
    token: Token = None,
) -> None:
    """Soft-delete a secret (recoverable with `secret restore`), or destroy it."""
    backend, path = _split_ref(ref)
    with _client(addr, token) as c:
        c.request("DELETE", f"/v1/secrets/{seg(backend)}/{seg(path)}", params={"destroy": destroy or None})
    typer.echo(f"{'destroyed' if destroy else 'deleted'} {backend}/{path}")


@secret_app.command("restore")
def secret_restore(
    ref: Annotated[str, typer.Argument(metavar="BACKEND/PATH")],
    addr: Addr = None,
    token: Token = None,
) -> None:
    """Undo a soft delete."""
    backend, path = _split_ref(ref)
    with _client(addr, token) as c:
        out = c.request("POST", f"/v1/secrets/{seg(backend)}/{seg(path)}:restore")
    typer.echo(f"restored {backend}/{path} at version {out['current_version']}")


# --- backends ---------------------------------------------------------------


@backend_app.command("list")
def backend_list(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """List registered backends."""
    with _client(addr, token) as c:
        out = c.get("/v1/backends")
    if as_json:
        _print_json(out)
        return
    for b in out["items"]:
        flag = " (built-in)" if b["builtin"] else ""
        typer.echo(f"{b['name']:<20} {b['type']:<8}{flag}")


@backend_app.command("add")
def backend_add(
    name: str,
    type_: Annotated[str, typer.Option("--type", help="Backend type, e.g. local.")],
    settings: Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", show_default=False)] = None,
    config_file: Annotated[Path | None, typer.Option("--config-file", help="JSON object of settings.")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Register (or replace) a backend."""
    config = _read_json_file(config_file) if config_file else _parse_pairs(settings or [], json_values=True)
    with _client(addr, token) as c:
        out = c.request("PUT", f"/v1/backends/{seg(name)}", json={"type": type_, "config": config})
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"backend {out['name']} ({out['type']}) saved")


@backend_app.command("check")
def backend_check(name: str, addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """Check that a backend is reachable."""
    with _client(addr, token) as c:
        out = c.request("POST", f"/v1/backends/{seg(name)}/check")
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"{name}: {'ok' if out['ok'] else 'FAILED'}: {out['message']}")
    if not out["ok"]:
        raise typer.Exit(1)


@backend_app.command("rm")
def backend_rm(name: str, addr: Addr = None, token: Token = None) -> None:
    """Remove a backend (refused while it holds secrets)."""
    with _client(addr, token) as c:
        c.request("DELETE", f"/v1/backends/{seg(name)}")
    typer.echo(f"removed backend {name}")


# --- keys -------------------------------------------------------------------


def _print_key_status(out: dict[str, Any]) -> None:
    typer.echo(f"source:           {out['source']}")
    typer.echo(f"current version:  {out['current_version']}")
    typer.echo(f"re-wrap pending:  {out['rewrap_pending']}{' (rotating)' if out['rotating'] else ''}")
    typer.echo("versions:")
    for v in out["versions"]:
        note = "  (nothing references it; it may be removed from the KEK file)" if v["state"] == "retired" else ""
        typer.echo(f"  {v['version']:>3}  {v['state']:<8} refs={v['references']:<6} fp={v['fingerprint']}{note}")


@keys_app.command("status")
def keys_status(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """KEK versions and what references each."""
    with _client(addr, token) as c:
        out = c.get("/v1/keys/status")
    _print_json(out) if as_json else _print_key_status(out)


@keys_app.command("rotate")
def keys_rotate(
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until every data key is re-wrapped.")] = True,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Add a KEK version and re-wrap every data key under it, while the gateway serves."""
    with _client(addr, token) as c:
        out = c.request("POST", "/v1/keys/rotate")
        if not as_json:
            typer.echo(f"KEK version {out['current_version']} is current; re-wrapping {out['rewrap_pending']} data key(s)")
        while wait and (out["rotating"] or out["rewrap_pending"]):
            time.sleep(0.2)
            out = c.get("/v1/keys/status")
    _print_json(out) if as_json else _print_key_status(out)


# --- admin keys -------------------------------------------------------------


@admin_key_app.command("create")
def admin_key_create(
    name: str,
    role: Annotated[str, typer.Option("--role", help="admin, operator or auditor.")] = "admin",
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Create an admin API key; its token is printed once."""
    with _client(addr, token) as c:
        out = c.request("POST", "/v1/admin-keys", json={"name": name, "role": role})
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"created {out['id']} ({out['role']}); its token, shown once:")
        typer.echo(f"CREDGATE_TOKEN={out['token']}")


@admin_key_app.command("list")
def admin_key_list(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """List admin API keys."""
    with _client(addr, token) as c:
        out = c.get("/v1/admin-keys")
    if as_json:
        _print_json(out)
        return
    for k in out["items"]:
        state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "active"
        typer.echo(f"{k['id']}  {k['name']:<20} {k['role']:<9} {state}")


@admin_key_app.command("revoke")
def admin_key_revoke(key_id: str, addr: Addr = None, token: Token = None) -> None:
    """Revoke an admin API key."""
    with _client(addr, token) as c:
        c.request("POST", f"/v1/admin-keys/{seg(key_id)}/revoke")
    typer.echo(f"revoked {key_id}")


# --- connectors -------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None) -> int | None:
    """'90', '90s', '15m', '1h', '2d' -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:], None)
    number = t[:-1] if unit else t
    if not number.isdigit() or int(number) <= 0:
        raise UsageProblem(f"{text!r} is not a duration like 90s, 15m, 1h or 2d")
    return int(number) * (unit or 1)


def _connector_line(c: dict[str, Any]) -> str:
    return f"{c['name']:<20} {c['type']:<9} {c['auth_method']:<11} {c['secret']:<30} {', '.join(c['resources'])}"


@connector_app.command("types")
def connector_types(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """Connector types, their auth methods, resources and revocability."""
    with _client(addr, token) as c:
        out = c.get("/v1/connector-types")
    if as_json:
        _print_json(out)
        return
    for t in out["items"]:
        if not t["available"]:
            typer.echo(f"{t['type']:<9} unavailable: {t['reason']}")
            continue
        typer.echo(
            f"{t['type']:<9} auth: {', '.join(t['auth_methods'])}; resources: {', '.join(t['resource_types'])}; "
            f"{t['revocability']}{', renewable' if t['renewable'] else ''}{', wrap-only' if t['wrap_only'] else ''}; "
            f"ttl {t['min_ttl_seconds']}s..{t['max_ttl_seconds']}s (default {t['default_ttl_seconds']}s)"
        )


@connector_app.command("add")
def connector_add(
    name: str,
    type_: Annotated[str, typer.Option("--type", help="Connector type (see `credgate connector types`).")],
    auth_method: Annotated[str, typer.Option("--auth-method", help="One of the type's auth methods.")],
    secret: Annotated[str, typer.Option("--secret", help="BACKEND/PATH of the secret holding the material.")],
    resource: Annotated[list[str], typer.Option("--resource", help="Allowed resource pattern (repeatable).")],
    settings: Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", show_default=False)] = None,
    config_file: Annotated[Path | None, typer.Option("--config-file", help="JSON object of settings.")] = None,
    default_ttl: Annotated[str | None, typer.Option("--default-ttl", help="e.g. 15m")] = None,
    max_ttl: Annotated[str | None, typer.Option("--max-ttl", help="e.g. 1h")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Register (or replace) a connector."""
    _split_ref(secret)
    config = _read_json_file(config_file) if config_file else _parse_pairs(settings or [], json_values=True)
    body = {
        "type": type_, "auth_method": auth_method, "secret": secret, "config": config, "resources": resource,
        "default_ttl_seconds": parse_duration(default_ttl), "max_ttl_seconds": parse_duration(max_ttl),
    }
    with _client(addr, token) as c:
        out = c.request("PUT", f"/v1/connectors/{seg(name)}", json=body)
    _print_json(out) if as_json else typer.echo(f"connector {out['name']} ({out['type']}) saved")


@connector_app.command("list")
def connector_list(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """List connectors."""
    with _client(addr, token) as c:
        out = c.get("/v1/connectors")
    if as_json:
        _print_json(out)
    else:
        for item in out["items"]:
            typer.echo(_connector_line(item))


@connector_app.command("show")
def connector_show(name: str, addr: Addr = None, token: Token = None) -> None:
    """Show a connector (never its material)."""
    with _client(addr, token) as c:
        _print_json(c.get(f"/v1/connectors/{seg(name)}"))


@connector_app.command("verify")
def connector_verify(name: str, addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """Check the connector's material against its target."""
    with _client(addr, token) as c:
        out = c.request("POST", f"/v1/connectors/{seg(name)}/verify")
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"{name}: {'ok' if out['ok'] else 'FAILED'}: {out['message']}")
        if out.get("identity"):
            typer.echo(f"identity: {out['identity']}")
        for rtype, items in out["reachable"].items():
            typer.echo(f"{rtype}: {', '.join(items) or '-'}")
    if not out["ok"]:
        raise typer.Exit(1)


@connector_app.command("resources")
def connector_resources(
    name: str,
    type_: Annotated[str, typer.Option("--type", help="Resource type, e.g. database, schema, s3-bucket.")],
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """List resources of one type that the connector can see."""
    with _client(addr, token) as c:
        out = c.get(f"/v1/connectors/{seg(name)}/resources", type=type_)
    _print_json(out) if as_json else [typer.echo(r) for r in out["items"]]


@connector_app.command("rm")
def connector_rm(
    name: str,
    revoke_leases: Annotated[bool, typer.Option("--revoke-leases", help="Revoke its live leases first.")] = False,
    addr: Addr = None,
    token: Token = None,
) -> None:
    """Remove a connector (refused while it has live leases)."""
    with _client(addr, token) as c:
        c.request("DELETE", f"/v1/connectors/{seg(name)}", params={"revoke_leases": revoke_leases or None})
    typer.echo(f"removed connector {name}")


# --- credentials --------------------------------------------------------------


def _print_credential(out: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        _print_json(out)
        return
    cred = out.get("credential") or {}
    if fmt == "env":
        import shlex

        lines = {"CREDGATE_LEASE_ID": out["lease_id"], "CREDGATE_EXPIRES_AT": str(out["expires_at"])}
        if out.get("wrap_token"):
            lines["CREDGATE_WRAP_TOKEN"] = out["wrap_token"]
        for k, v in cred.items():
            lines[k.upper().replace("-", "_")] = v
        for k, v in lines.items():
            typer.echo(f"export {k}={shlex.quote(v)}")
        return
    typer.echo(f"lease:    {out['lease_id']}")
    typer.echo(f"expires:  {out['expires_at']}" + ("  (ttl capped at the connector's max)" if out.get("ttl_capped") else ""))
    typer.echo(f"renewable: {'yes' if out['renewable'] else 'no'}; {out['revocability']}")
    if out.get("wrap_token"):
        typer.echo(f"wrap token (single use, until {out['wrap_expires_at']}):")
        typer.echo(out["wrap_token"])
    for k, v in cred.items():
        typer.echo(f"{k}={v}")


Format = Annotated[str, typer.Option("--format", help="text, json or env (export lines for eval).")]


@cred_app.command("issue")
def cred_issue(
    connector: str,
    resource: str,
    ttl: Annotated[str | None, typer.Option("--ttl", help="e.g. 15m; capped at the connector's max.")] = None,
    wrap: Annotated[bool, typer.Option("--wrap", help="Return a single-use wrap token instead.")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe key.")] = None,
    fmt: Format = "text",
    addr: Addr = None,
    token: Token = None,
) -> None:
    """Issue a short-lived credential for one resource."""
    if fmt not in ("text", "json", "env"):
        raise UsageProblem("--format is one of text, json, env")
    body = {"connector": connector, "resource": resource, "ttl_seconds": parse_duration(ttl), "wrap": wrap}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    with _client(addr, token) as c:
        out = c.request("POST", "/v1/credentials", json=body, headers=headers)
    _print_credential(out, fmt)


@app.command("unwrap")
def unwrap_cmd(
    wrap_token: Annotated[str, typer.Argument(metavar="TOKEN")],
    fmt: Format = "text",
    addr: Addr = None,
) -> None:
    """Exchange a wrap token for its credential (works once)."""
    if fmt not in ("text", "json", "env"):
        raise UsageProblem("--format is one of text, json, env")
    with Client(addr, token="") as c:
        out = c.request("POST", "/v1/unwrap", json={"wrap_token": wrap_token})
    _print_credential(out, fmt)


# --- leases -------------------------------------------------------------------


def _lease_line(lease: dict[str, Any]) -> str:
    return (
        f"{lease['lease_id']}  {lease['state']:<8} {lease['connector']:<16} {lease['resource']:<24} "
        f"expires {lease['expires_at']}  {lease['principal']}"
    )


@lease_app.command("list")
def lease_list(
    connector: Annotated[str | None, typer.Option("--connector")] = None,
    principal: Annotated[str | None, typer.Option("--principal")] = None,
    state: Annotated[str | None, typer.Option("--state", help="pending, active, revoking, revoked, expired")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """List leases (newest last)."""
    with _client(addr, token) as c:
        out = c.get("/v1/leases", connector=connector, principal=principal, state=state, limit=limit)
    if as_json:
        _print_json(out)
    else:
        for lease in out["items"]:
            typer.echo(_lease_line(lease))


@lease_app.command("show")
def lease_show(lease_id: str, addr: Addr = None, token: Token = None) -> None:
    """Show a lease."""
    with _client(addr, token) as c:
        _print_json(c.get(f"/v1/leases/{seg(lease_id)}"))


@lease_app.command("renew")
def lease_renew(
    lease_id: str,
    ttl: Annotated[str | None, typer.Option("--ttl", help="e.g. 30m; never past the lease's max.")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Extend a renewable lease."""
    with _client(addr, token) as c:
        out = c.request("POST", f"/v1/leases/{seg(lease_id)}/renew", json={"ttl_seconds": parse_duration(ttl)})
    _print_json(out) if as_json else typer.echo(f"{lease_id} now expires {out['expires_at']}")


@lease_app.command("revoke")
def lease_revoke(
    lease_id: Annotated[str | None, typer.Argument(help="One lease; or use --connector/--principal.")] = None,
    connector: Annotated[str | None, typer.Option("--connector", help="Every live lease of this connector.")] = None,
    principal: Annotated[str | None, typer.Option("--principal", help="Every live lease of this principal.")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Revoke one lease, or every live lease of a connector and/or principal."""
    if bool(lease_id) == bool(connector or principal):
        raise UsageProblem("give a LEASE_ID, or --connector and/or --principal")
    with _client(addr, token) as c:
        if lease_id:
            out = c.request("POST", f"/v1/leases/{seg(lease_id)}/revoke")
            msg = f"{lease_id}: {out['state']}" + (f" ({out['last_error']}; the reaper retries)" if out["state"] == "revoking" else "")
        else:
            out = c.request("POST", "/v1/leases/revoke", json={"connector": connector, "principal": principal})
            msg = f"revoked {out['revoked']} of {out['matched']} lease(s)" + (
                f"; {len(out['still_revoking'])} still being retried" if out["still_revoking"] else ""
            )
    _print_json(out) if as_json else typer.echo(msg)


# --- entry point ------------------------------------------------------------


def _fail(code: int, message: str) -> NoReturn:
    sys.stderr.write(f"credgate: {message}\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        rv = app(args=argv, standalone_mode=False)
    except click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(exc.format_message() + "\n")
            sys.exit(0)
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        _fail(2, exc.format_message().replace("\n", " ") + where)
    except click_exc.ClickException as exc:
        _fail(2, exc.format_message().replace("\n", " "))
    except typer.Abort:
        _fail(130, "aborted")
    except (UsageProblem, ConfigurationError) as exc:
        _fail(2, str(exc))
    except RequestFailed as exc:
        _fail(1, f"{exc.code}: {exc.message}")
    except GatewayUnreachable as exc:
        _fail(1, str(exc))
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()
