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

Exit codes: 0 success, 1 a request the gateway refused or could not serve, or a
"no" answer (``policy explain`` deny, a failed ``check``/``verify``), 2 bad usage or
configuration (always one line on stderr).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from gateway import paths
from gateway.client.http import DEFAULT_ADDR, Client, GatewayUnreachable, RequestFailed, seg
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
keys_app = typer.Typer(help="The key-encryption key (KEK): generate, rotate, status; the token-signing key.",
                       no_args_is_help=True)
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


def _print_items(out: dict[str, Any], as_json: bool, line: Any) -> None:
    """A list response: raw JSON, or one line per item."""
    if as_json:
        _print_json(out)
    else:
        for item in out["items"]:
            typer.echo(line(item))


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
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="Serve HTTPS with this PEM certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="The PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option("--tls-client-ca", help="Verify client certificates against these PEM CAs.")
    ] = None,
    tls_require_client_cert: Annotated[
        bool, typer.Option("--tls-require-client-cert", help="Refuse connections without a client certificate.")
    ] = False,
) -> None:
    """Run the gateway."""
    import uvicorn

    from gateway.web.app import create_app
    from gateway.web.logs import configure
    from gateway.runtime import check_bootstrap_file, keyring_for
    from gateway.settings import load_settings
    from gateway.store.database import check_sole_use
    from gateway.web.tls import uvicorn_options

    settings = load_settings(
        config, dev=dev or None, data_dir=data_dir, host=host, port=port, tls_cert_file=tls_cert,
        tls_key_file=tls_key, tls_client_ca_file=tls_client_ca, tls_require_client_cert=tls_require_client_cert or None,
    )
    configure(settings.log_format, settings.log_level)
    keyring_for(settings)  # fail fast, with one line, before the server starts
    check_bootstrap_file(settings)  # the same for where a generated admin token would go
    check_sole_use(settings.store_url)  # the same for a SQLite store another process serves
    tls = uvicorn_options(settings)  # the same for certificate files
    if settings.dev:
        scheme = "https" if tls else "http"
        typer.echo(f"credgate dev mode: data in {settings.data_dir}, listening on {scheme}://{settings.host}:{settings.port}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=10,
        # Slow or greedy clients: bounded concurrency, short keep-alive, bounded header blocks.
        limit_concurrency=settings.max_concurrency,
        timeout_keep_alive=settings.keep_alive_seconds,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        server_header=False,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1 (or FORWARDED_ALLOW_IPS); the
        # gateway resolves the client address itself, from CREDGATE_TRUSTED_PROXIES only.
        proxy_headers=False,
        **tls,
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
    from gateway.crypto.keyring import new_key_file

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


@keys_app.command("rotate-signing")
def keys_rotate_signing(
    grace: Annotated[int, typer.Option(
        "--grace", min=0, max=86400,
        help="Seconds the old key keeps verifying the tokens it signed (a planned rotation). "
        "Default 0: they are refused at once (a rotation after a compromise).")] = 0,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """A new token-signing key; tokens signed by the old one are refused at once, or after --grace."""
    with _client(addr, token) as c:
        out = c.request("POST", "/v1/keys/signing/rotate", json={"grace_seconds": grace})
    if as_json:
        _print_json(out)
    elif grace:
        typer.echo(f"signing key {out['active_kid']} is active; the old key verifies tokens for {grace} more second(s)")
    else:
        typer.echo(f"signing key {out['active_kid']} is active; tokens signed by any other key are refused")


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
    _print_items(out, as_json, _connector_line)


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
    principal: Annotated[str | None, typer.Option(
        "--principal", help="Owner ISSUER/SUBJECT (k8s/system:serviceaccount:ml:trainer); client:x means credgate/client:x.",
    )] = None,
    state: Annotated[str | None, typer.Option("--state", help="pending, active, revoking, revoked, expired")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """List leases (newest last)."""
    with _client(addr, token) as c:
        out = c.get("/v1/leases", connector=connector, principal=principal, state=state, limit=limit)
    _print_items(out, as_json, _lease_line)


@lease_app.command("show")
def lease_show(lease_id: str, addr: Addr = None, token: Token = None) -> None:
    """Show a lease."""
    with _client(addr, token) as c:
        _print_json(c.get(f"/v1/leases/{seg(lease_id)}"))


@lease_app.command("renew")
def lease_renew(
    lease_id: str,
    ttl: Annotated[str | None, typer.Option("--ttl", help="e.g. 30m; capped as issuance caps it now, never past the lease's max.")] = None,
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
    principal: Annotated[str | None, typer.Option(
        "--principal", help="Every live lease of this owner, ISSUER/SUBJECT (client:x means credgate/client:x).",
    )] = None,
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


# --- trusted issuers ------------------------------------------------------------


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UsageProblem(f"can't read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageProblem(f"{path} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise UsageProblem(f"{path} must hold a JSON object ({what})")
    return raw


def _key_values(pairs: list[str], option: str, example: str) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageProblem(f"{option} takes KEY=VALUE, e.g. {option} {example}")
        out.append((key.strip(), value.strip()))
    return out


def _issuer_lines(out: dict[str, Any]) -> None:
    typer.echo(f"issuer:      {out['name']}")
    typer.echo(f"issuer url:  {out['issuer_url']}")
    inline = len((out.get("jwks") or {}).get("keys", []))
    typer.echo(f"keys:        {out['jwks_url'] or f'inline JWK set ({inline} key(s))'}")
    typer.echo(f"audiences:   {', '.join(out['audiences'])}")
    typer.echo(f"algorithms:  {', '.join(out['algorithms'])}")
    typer.echo(f"leeway:      {out['leeway_seconds']}s")
    mapping = out.get("claim_mapping") or {}
    typer.echo("claims:      " + (", ".join(f"{k}={v}" for k, v in sorted(mapping.items())) or "subject=sub (default)"))
    roles = out.get("role_mapping") or {}
    typer.echo("role map:    " + (", ".join(f"{g}={'+'.join(r)}" for g, r in sorted(roles.items())) or "-"))


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
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Trust an issuer's JWTs (or replace its settings). Checks its keys first (see `issuer check`)."""
    if (jwks_url is None) == (jwks_file is None):
        raise UsageProblem("give exactly one of --jwks-url URL and --jwks-file FILE")
    body: dict[str, Any] = {
        "issuer_url": issuer_url,
        "audiences": audience,
        "claim_mapping": dict(_key_values(claim_map or [], "--map", "groups=groups")),
        "role_mapping": {},
    }
    if jwks_url is not None:
        body["jwks_url"] = jwks_url
    else:
        assert jwks_file is not None
        body["jwks"] = _read_json_object(jwks_file, 'a JWK set: {"keys": [...]}')
    for group, roles in _key_values(role_map or [], "--role-map", "credgate-admins=admin"):
        wanted = body["role_mapping"].setdefault(group, [])
        wanted.extend(r.strip() for r in roles.split(",") if r.strip() and r.strip() not in wanted)
    if algorithm:
        body["algorithms"] = algorithm
    if leeway is not None:
        body["leeway_seconds"] = leeway
    with _client(addr, token) as c:
        out = c.request("PUT", f"/v1/issuers/{seg(name)}", json=body, params={"check": True} if check else None)
    _print_json(out) if as_json else typer.echo(f"issuer {out['name']} ({out['issuer_url']}) saved")


@issuer_app.command("check")
def issuer_check(name: str, addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """Read an issuer's JWK set now (from its jwks_url) and list its keys; exit 1 if none is usable."""
    with _client(addr, token) as c:
        out = c.request("POST", f"/v1/issuers/{seg(name)}/check")
    if as_json:
        _print_json(out)
    else:
        state = "ok" if out["ok"] else f"{out['code']}"
        typer.echo(f"{out['name']}: {state}, {out['usable_keys']} usable key(s) of {len(out['keys'])} in {out['source']}")
        for k in out["keys"]:
            what = "usable" if k["usable"] else f"unusable: {k['problem']}"
            typer.echo(f"  kid={k['kid'] or '-'} kty={k['kty'] or '-'} alg={k['alg'] or '-'}: {what}")
        if not out["ok"]:
            typer.echo(f"  {out['message']}")
    if not out["ok"]:
        raise typer.Exit(1)


@issuer_app.command("list")
def issuer_list(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """List trusted issuers."""
    with _client(addr, token) as c:
        out = c.get("/v1/issuers")
    if as_json:
        _print_json(out)
        return
    for i in out["items"]:
        typer.echo(f"{i['name']:<20} {i['issuer_url']:<40} aud={','.join(i['audiences'])}")


@issuer_app.command("show")
def issuer_show(name: str, addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """Show a trusted issuer."""
    with _client(addr, token) as c:
        out = c.get(f"/v1/issuers/{seg(name)}")
    _print_json(out) if as_json else _issuer_lines(out)


@issuer_app.command("rm")
def issuer_rm(name: str, addr: Addr = None, token: Token = None) -> None:
    """Stop trusting an issuer."""
    with _client(addr, token) as c:
        c.request("DELETE", f"/v1/issuers/{seg(name)}")
    typer.echo(f"removed issuer {name}")


# --- OAuth2 clients ---------------------------------------------------------------


def _client_line(cl: dict[str, Any]) -> str:
    state = f"revoked {cl['revoked_at']}" if cl["revoked_at"] else "active"
    return (f"{cl['client_id']:<24} {','.join(cl['roles']) or '-':<22} ttl={cl['token_ttl_seconds']}s "
            f"{cl['auth_method']:<15} {state}")


@client_app.command("create")
def client_create(
    client_id: Annotated[str, typer.Argument(metavar="ID")],
    role: Annotated[list[str] | None, typer.Option("--role", help="admin, operator or auditor (repeatable).")] = None,
    token_ttl: Annotated[str | None, typer.Option("--token-ttl", help="Lifetime of its tokens, e.g. 15m [default: 15m].")] = None,
    jwks_file: Annotated[Path | None, typer.Option("--jwks-file", help="Public keys for private_key_jwt; no secret is made.")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Register an OAuth2 client; its secret (if any) is printed once."""
    body: dict[str, Any] = {"client_id": client_id, "roles": role or []}
    if token_ttl is not None:
        body["token_ttl_seconds"] = parse_duration(token_ttl)
    if jwks_file is not None:
        body["jwks"] = _read_json_object(jwks_file, 'a JWK set: {"keys": [...]}')
    with _client(addr, token) as c:
        out = c.request("POST", "/v1/clients", json=body)
    if as_json:
        _print_json(out)
    elif out.get("client_secret"):
        typer.echo(f"created client {out['client_id']} ({', '.join(out['roles']) or 'no roles'}); its secret, shown once:")
        typer.echo(f"CREDGATE_CLIENT_SECRET={out['client_secret']}")
    else:
        typer.echo(f"created client {out['client_id']} ({', '.join(out['roles']) or 'no roles'}; {out['auth_method']})")


@client_app.command("list")
def client_list(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """List OAuth2 clients (never their secrets: only hashes are kept)."""
    with _client(addr, token) as c:
        out = c.get("/v1/clients")
    _print_items(out, as_json, _client_line)


@client_app.command("revoke")
def client_revoke(client_id: Annotated[str, typer.Argument(metavar="ID")], addr: Addr = None, token: Token = None) -> None:
    """Revoke a client: it gets no new tokens."""
    with _client(addr, token) as c:
        c.request("POST", f"/v1/clients/{seg(client_id)}/revoke")
    typer.echo(f"revoked client {client_id}")


# --- policies ---------------------------------------------------------------------


@policy_app.command("put")
def policy_put(
    name: str,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The policy document: YAML, or JSON if it ends in .json.")],
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Create or replace a policy from a YAML or JSON file."""
    try:
        content = file.read_bytes()
    except OSError as exc:
        raise UsageProblem(f"can't read {file}: {exc.strerror}") from None
    media = "application/json" if file.suffix.lower() == ".json" else "application/yaml"
    with _client(addr, token) as c:
        out = c.request("PUT", f"/v1/policies/{seg(name)}", content=content, headers={"Content-Type": media})
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"policy {out['name']} saved ({len(out['document'].get('rules', []))} rule(s))")


@policy_app.command("list")
def policy_list(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """List policies."""
    with _client(addr, token) as c:
        out = c.get("/v1/policies")
    if as_json:
        _print_json(out)
        return
    for p in out["items"]:
        doc = p["document"]
        typer.echo(f"{p['name']:<24} {len(doc.get('rules', [])):>3} rule(s)  updated {p['updated_at']}"
                   + (f"  {doc['description']}" if doc.get("description") else ""))


@policy_app.command("show")
def policy_show(name: str, addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """Show a policy document (as YAML; --json for the raw response)."""
    import yaml

    with _client(addr, token) as c:
        out = c.get(f"/v1/policies/{seg(name)}")
    if as_json:
        _print_json(out)
        return
    typer.echo(f"# policy {out['name']}, updated {out['updated_at']}")
    typer.echo(yaml.safe_dump(out["document"], sort_keys=False).rstrip("\n"))


@policy_app.command("rm")
def policy_rm(name: str, addr: Addr = None, token: Token = None) -> None:
    """Remove a policy."""
    with _client(addr, token) as c:
        c.request("DELETE", f"/v1/policies/{seg(name)}")
    typer.echo(f"removed policy {name}")


@policy_app.command("explain")
def policy_explain(
    subject: Annotated[str, typer.Option("--subject", help="e.g. alice, system:serviceaccount:ml:trainer, client:zenml.")],
    action: Annotated[str, typer.Option("--action", help="e.g. credentials:issue, secrets:reveal.")],
    issuer: Annotated[str, typer.Option("--issuer", help="Trusted issuer name; 'credgate' for keys, clients, runs.")] = "credgate",
    role: Annotated[list[str] | None, typer.Option("--role", help="A role the principal holds (repeatable).")] = None,
    claim: Annotated[list[str] | None, typer.Option("--claim", help="NAME=VALUE; repeat a name for a list (groups).")] = None,
    connector: Annotated[str | None, typer.Option("--connector")] = None,
    resource: Annotated[str | None, typer.Option("--resource")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Would this principal be allowed this action? Prints allow or deny, the rule and the reason;
    exits 1 on deny (like a failed check), so a script can branch on the answer."""
    claims: dict[str, Any] = {}
    for key, value in _key_values(claim or [], "--claim", "groups=ml-team"):
        if key in claims:
            claims[key] = (claims[key] if isinstance(claims[key], list) else [claims[key]]) + [value]
        else:
            claims[key] = value
    body = {
        "principal": {"issuer": issuer, "subject": subject, "roles": role or [], "claims": claims},
        "action": action, "connector": connector, "resource": resource,
    }
    with _client(addr, token) as c:
        out = c.request("POST", "/v1/policies/explain", json=body)
    if as_json:
        _print_json(out)
    else:
        typer.echo(out["decision"])
        typer.echo(f"rule:    {out['rule'] or '-'}")
        typer.echo(f"reason:  {out['reason']}")
        if out.get("max_ttl_seconds") is not None:
            typer.echo(f"max ttl: {out['max_ttl_seconds']}s")
    if out["decision"] != "allow":
        raise typer.Exit(1)


# --- runs -------------------------------------------------------------------------

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
    fmt: Annotated[str, typer.Option("--format", help="text (the token), json, or env (an export line for eval).")] = "text",
    addr: Addr = None,
    token: Token = None,
) -> None:
    """Mint a token for one pipeline run, scoped to a subset of your own rights."""
    _run_id(run_id)
    if fmt not in ("text", "json", "env"):
        raise UsageProblem("--format is one of text, json, env")
    body: dict[str, Any] = {"connectors": connector, "resources": resource}
    if ttl is not None:
        body["ttl_seconds"] = parse_duration(ttl)
    with _client(addr, token) as c:
        out = c.request("POST", f"/v1/runs/{seg(run_id)}/token", json=body)
    if fmt == "json":
        _print_json(out)
    elif fmt == "env":
        import shlex

        typer.echo(f"export CREDGATE_TOKEN={shlex.quote(out['token'])}")
    else:
        typer.echo(out["token"])


@run_app.command("revoke")
def run_revoke(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")], addr: Addr = None, token: Token = None, as_json: Json = False
) -> None:
    """End a run: its token stops working and its leases are revoked."""
    _run_id(run_id)
    with _client(addr, token) as c:
        out = c.request("POST", f"/v1/runs/{seg(run_id)}/revoke")
    if as_json:
        _print_json(out)
        return
    still = out["leases_still_revoking"]
    typer.echo(f"revoked run {run_id}; {out['leases_revoked']} lease(s) revoked"
               + (f", {len(still)} still being retried by the reaper" if still else ""))


# --- sign-in: login, whoami, logout --------------------------------------------------

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
IDP_TIMEOUT = 10.0
MAX_DEVICE_WAIT = 1800  # never poll longer than this, whatever the IdP says


class LoginFailed(RequestFailed):
    """The sign-in was refused or could not finish: exit 1, one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(0, code, message)


def profile_path() -> Path:
    """``$CREDGATE_PROFILE``, else ``$XDG_CONFIG_HOME/credgate/profile.json`` (``~/.config`` by default)."""
    if os.environ.get("CREDGATE_PROFILE"):
        return Path(os.environ["CREDGATE_PROFILE"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "credgate" / "profile.json"


def _load_profile() -> dict[str, Any] | None:
    path = profile_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageProblem(f"can't read the profile {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageProblem(f"the profile {path} is not valid JSON; `credgate logout` removes it") from None
    if not (isinstance(raw, dict) and isinstance(raw.get("addr"), str) and isinstance(raw.get("access_token"), str)):
        raise UsageProblem(f"the profile {path} is not a credgate profile; `credgate logout` removes it")
    return raw


def _write_profile(data: dict[str, Any]) -> Path:
    """Atomically, created 0600 (its directory 0700 when we create it)."""
    path = profile_path()
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _profile_token(addr: str | None) -> tuple[str | None, str | None]:
    """The stored sign-in for ``addr`` (or for the profile's gateway when none is given)."""
    profile = _load_profile()
    if profile is None:
        return addr, None
    target = (addr or profile["addr"]).rstrip("/")
    if target != profile["addr"].rstrip("/"):
        return addr, None  # never send a gateway's token to another server
    expires = profile.get("expires_at")
    if isinstance(expires, (int, float)) and expires <= time.time():
        when = datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")
        raise LoginFailed("login_expired", f"the sign-in to {target} expired at {when}; run `credgate login` again")
    return target, profile["access_token"]


def _oauth_error(resp: httpx.Response) -> str:
    """The RFC 6749 5.2 ``error`` code of a refusal (never its free text: it's the IdP's)."""
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, str) and err.replace("_", "").isalnum() and len(err) <= 64:
        return err
    return f"http_{resp.status_code}"


def _idp_json(http: httpx.Client, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
    try:
        resp = http.request("POST" if "data" in kwargs else "GET", url, **kwargs)
    except httpx.TransportError as exc:
        raise LoginFailed("idp_unreachable", f"can't reach the identity provider for {what} ({type(exc).__name__})") from None
    if resp.status_code != 200:
        raise LoginFailed(_oauth_error(resp), f"the identity provider refused {what} (HTTP {resp.status_code})")
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise LoginFailed("idp_bad_response", f"the identity provider's answer to {what} is not a JSON object")
    return doc


def _seconds(value: Any, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default


def _device_flow(http: httpx.Client, config: dict[str, Any]) -> str:
    """RFC 8628: show the code, poll until approved; returns the IdP's id_token."""
    issuer = config["issuer_url"].rstrip("/")
    disco = _idp_json(http, f"{issuer}/.well-known/openid-configuration", "its discovery document")
    if disco.get("issuer", "").rstrip("/") != issuer:
        raise LoginFailed("idp_bad_response", f"the discovery document of {issuer} names another issuer")
    device_ep, token_ep = disco.get("device_authorization_endpoint"), disco.get("token_endpoint")
    if not (isinstance(device_ep, str) and isinstance(token_ep, str)):
        raise LoginFailed("idp_no_device_flow", f"the identity provider at {issuer} does not offer device sign-in")
    device = _idp_json(
        http, device_ep, "the device authorization", data={"client_id": config["client_id"], "scope": config["scopes"]}
    )
    if not all(isinstance(device.get(k), str) for k in ("device_code", "user_code", "verification_uri")):
        raise LoginFailed("idp_bad_response", "the device authorization lacks device_code, user_code or verification_uri")
    typer.echo(f"To sign in, open {device['verification_uri']} and enter the code: {device['user_code']}", err=True)
    if isinstance(device.get("verification_uri_complete"), str):
        typer.echo(f"(or open {device['verification_uri_complete']})", err=True)
    typer.echo("Waiting for the sign-in to be approved...", err=True)

    interval = max(_seconds(device.get("interval"), 5), 1)
    deadline = time.monotonic() + min(_seconds(device.get("expires_in"), 600), MAX_DEVICE_WAIT)
    form = {"grant_type": DEVICE_GRANT, "device_code": device["device_code"], "client_id": config["client_id"]}
    while True:
        time.sleep(interval)
        if time.monotonic() > deadline:
            raise LoginFailed("expired_token", "the code expired before the sign-in was approved; run `credgate login` again")
        try:
            resp = http.post(token_ep, data=form, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise LoginFailed("idp_unreachable", f"can't reach the identity provider's token endpoint ({type(exc).__name__})") from None
        if resp.status_code == 200:
            break
        error = _oauth_error(resp)
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5  # RFC 8628 3.5
            continue
        if error == "access_denied":
            raise LoginFailed("access_denied", "the sign-in was denied at the identity provider")
        if error == "expired_token":
            raise LoginFailed("expired_token", "the code expired before the sign-in was approved; run `credgate login` again")
        raise LoginFailed(error, "the identity provider refused the sign-in")
    try:
        id_token = resp.json().get("id_token")
    except (ValueError, AttributeError):
        id_token = None
    if not isinstance(id_token, str) or not id_token:
        raise LoginFailed("idp_no_id_token", "the identity provider sent no id_token (is 'openid' among the login scopes?)")
    return id_token


def _exchange(addr: str, id_token: str) -> dict[str, Any]:
    """RFC 8693 at the gateway: the IdP's id_token for a gateway access token."""
    form = {"grant_type": TOKEN_EXCHANGE, "subject_token": id_token, "subject_token_type": ID_TOKEN_TYPE}
    try:
        resp = httpx.post(f"{addr}/v1/auth/token", data=form, timeout=30.0, headers={"User-Agent": "credgate-client"})
    except httpx.TransportError as exc:
        raise GatewayUnreachable(f"can't reach the gateway at {addr} ({type(exc).__name__})") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        # The gateway's error_description is written by credgate: safe to show.
        detail = body.get("error_description") if isinstance(body, dict) else None
        raise LoginFailed(_oauth_error(resp), f"the gateway refused the sign-in: {detail or f'HTTP {resp.status_code}'}")
    return body


@app.command()
def login(addr: Addr = None) -> None:
    """Sign in through the gateway's identity provider (device flow); keeps the token in your profile."""
    target = (addr or DEFAULT_ADDR).rstrip("/")
    with Client(target, token="") as c:
        config = c.get("/v1/auth/login-config")
    with httpx.Client(timeout=IDP_TIMEOUT, follow_redirects=False, headers={"Accept": "application/json"}) as http:
        id_token = _device_flow(http, config)
    out = _exchange(target, id_token)
    expires_at = int(time.time()) + _seconds(out.get("expires_in"), 0)
    with Client(target, token=out["access_token"]) as c:
        me = c.get("/v1/auth/whoami")
    path = _write_profile({"addr": target, "access_token": out["access_token"], "expires_at": expires_at})
    until = datetime.fromtimestamp(expires_at, timezone.utc).isoformat(timespec="seconds")
    typer.echo(f"signed in to {target} as {me['subject']} ({', '.join(me['roles']) or 'no roles'}) until {until}")
    typer.echo(f"token kept in {path}", err=True)


def _revoke_sign_in(addr: str, token: str) -> None:
    """RFC 7009 at the gateway that issued it: the token revokes itself (as its own bearer)."""
    keep = "the profile is kept: run `credgate logout` again, or `credgate logout --forget` to only delete it"
    try:
        resp = httpx.post(f"{addr}/v1/auth/revoke", data={"token": token, "token_type_hint": "access_token"},
                          headers={"Authorization": f"Bearer {token}", "User-Agent": "credgate-client"}, timeout=30.0)
    except httpx.TransportError as exc:
        raise LoginFailed("revoke_failed", f"can't reach {addr} to revoke the sign-in ({type(exc).__name__}); {keep}") from None
    if resp.status_code != 200:
        raise LoginFailed(_oauth_error(resp), f"the gateway did not revoke the sign-in (HTTP {resp.status_code}); {keep}")


@app.command()
def logout(
    forget: Annotated[bool, typer.Option(
        "--forget", help="Only delete the profile; the token is not revoked and works until it expires.")] = False,
) -> None:
    """Sign out: revoke the sign-in's token at the gateway, then delete the profile."""
    path = profile_path()
    if not path.exists():
        typer.echo("not signed in")
        return
    try:
        profile = _load_profile()
    except UsageProblem:
        profile = None  # not a profile: nothing to revoke, only a file to remove
    revoked = ""
    if profile is not None and not forget:
        expires = profile.get("expires_at")
        if not (isinstance(expires, (int, float)) and expires <= time.time()):
            _revoke_sign_in(profile["addr"].rstrip("/"), profile["access_token"])
            revoked = f"token revoked at {profile['addr']}, "
    path.unlink(missing_ok=True)
    typer.echo(f"signed out: {revoked}removed {path}")


@app.command()
def whoami(addr: Addr = None, token: Token = None, as_json: Json = False) -> None:
    """Who the gateway takes you for: kind, subject, issuer, roles."""
    with _client(addr, token) as c:
        out = c.get("/v1/auth/whoami")
    if as_json:
        _print_json(out)
        return
    typer.echo(f"kind:     {out['kind']}")
    typer.echo(f"subject:  {out['subject']}")
    typer.echo(f"issuer:   {out['issuer']}")
    typer.echo(f"roles:    {', '.join(out['roles']) or '-'}")
    if out.get("run_id"):
        typer.echo(f"run:      {out['run_id']}")


# --- audit -------------------------------------------------------------------

audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _audit_line(e: dict[str, Any]) -> str:
    who = f"{e.get('issuer') or '-'}/{e.get('subject') or '-'}"
    extra = f" lease={e['lease_id']}" if e.get("lease_id") else ""
    return f"{e['seq']:>7} {e['time']} {e.get('decision') or '-':<5} {e.get('outcome') or '':<24} {who} {e.get('action') or '-'} {e.get('target')}{extra}"


def _audit_pages(c: Client, params: dict[str, Any]):
    after = params.pop("after", None)
    while True:
        page = c.get("/v1/audit", **params, after=after, limit=1000)
        yield from page["items"]
        if not page["next_after"]:
            return
        after = page["next_after"]


AuditFilter = Annotated[str | None, typer.Option(help="Filter.")]


@audit_app.command("search")
def audit_search(
    subject: AuditFilter = None,
    action: AuditFilter = None,
    connector: AuditFilter = None,
    lease: Annotated[str | None, typer.Option("--lease", help="A lease id.")] = None,
    decision: Annotated[str | None, typer.Option(help="allow or deny")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time, e.g. 2026-11-26T00:00:00Z")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time")] = None,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Find audit events."""
    params = dict(subject=subject, action=action, connector=connector, lease_id=lease, decision=decision,
                  since=since, until=until)
    with _client(addr, token) as c:
        for event in _audit_pages(c, params):
            typer.echo(json.dumps(event, sort_keys=True) if as_json else _audit_line(event))


@audit_app.command("tail")
def audit_tail(
    n: Annotated[int, typer.Option("-n", min=1, max=1000, help="How many of the newest events.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    addr: Addr = None,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """The newest audit events (and, with -f, those that follow)."""
    with _client(addr, token) as c:
        events = list(_audit_pages(c, {}))
        for event in events[-n:]:
            typer.echo(json.dumps(event, sort_keys=True) if as_json else _audit_line(event))
        after = events[-1]["seq"] if events else 0
        while follow:
            time.sleep(1)
            for event in _audit_pages(c, {"after": after}):
                after = event["seq"]
                typer.echo(json.dumps(event, sort_keys=True) if as_json else _audit_line(event))


@audit_app.command("export")
def audit_export(
    since: Annotated[str | None, typer.Option(help="ISO time")] = None,
    addr: Addr = None,
    token: Token = None,
) -> None:
    """Every event as JSON lines (with its hash chain fields), for archiving or offline checks."""
    with _client(addr, token) as c:
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


@audit_app.command("verify")
def audit_verify(
    against: Annotated[Path | None, typer.Option(
        "--against", help="An audit sink file (type file): its newest checkpoints and events must match the store, "
                          "so a tail deleted from the store with its checkpoints is found.",
        show_default=False)] = None,
    addr: Addr = None, token: Token = None, as_json: Json = False,
) -> None:
    """Check the keyed chain and its checkpoints; exit 1 and name every bad, missing or uncovered event."""
    body = _against_lines(against) if against is not None else None
    with _client(addr, token) as c:
        out = c.get("/v1/audit/verify") if body is None else c.request("POST", "/v1/audit/verify", json=body)
    if as_json:
        _print_json(out)
    elif out["ok"]:
        compared = out.get("compared") or {}
        extra = (f", matches {compared.get('checkpoints', 0)} checkpoint(s) and {compared.get('events', 0)} event(s) "
                 f"of {against.name}") if against is not None else ""
        typer.echo(f"ok: {out['events']} events, {out['checkpoints']} checkpoint(s), "
                   f"covered to event {out.get('covered_to', out['events'])}{extra}")
    else:
        typer.echo(f"BROKEN: first bad event {out['first_bad_seq']}: {out['problem']}")
        for p in out.get("problems", [])[1:]:
            typer.echo(f"  also event {p['seq']}: {p['problem']}")
    if not out["ok"]:
        raise typer.Exit(1)


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
