"""``credgate exec CONNECTOR[:RESOURCE]... -- CMD ARGS``: run a program with short-lived
credentials in its environment, under the variables its client library reads (PGPASSWORD,
AWS_ACCESS_KEY_ID...), and take them back when it ends.

While CMD runs, renewable leases are renewed before they expire; when it exits (whatever
its exit code), or when credgate gets SIGINT/SIGTERM/SIGHUP (forwarded to CMD, which is then
waited for), every lease is revoked. The exit code is CMD's, or 128+N when CMD died of
signal N. Secret values go only into CMD's environment: never printed. ``CREDGATE_TOKEN``
is not passed on to CMD.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from gateway.cli.common import UsageProblem, client, parse_duration
from gateway.client.urls import seg

__all__ = ["ENV_MAPS", "environment", "exec_app"]

# connector type -> (credential key, variable) pairs; first present key wins per variable.
ENV_MAPS: dict[str, list[tuple[str, str]]] = {
    "postgres": [("host", "PGHOST"), ("port", "PGPORT"), ("username", "PGUSER"), ("password", "PGPASSWORD"),
                 ("dbname", "PGDATABASE"), ("database", "PGDATABASE")],
    "mysql": [("host", "MYSQL_HOST"), ("port", "MYSQL_TCP_PORT"), ("username", "MYSQL_USER"),
              ("password", "MYSQL_PWD"), ("database", "MYSQL_DATABASE")],
    "redis": [("url", "REDIS_URL")],
    "aws": [("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("aws_session_token", "AWS_SESSION_TOKEN"), ("region", "AWS_REGION"), ("region", "AWS_DEFAULT_REGION"),
            ("endpoint_url", "AWS_ENDPOINT_URL")],
}
# Variables of credgate's own that CMD must not inherit (the gateway token is not CMD's).
WITHHELD = ("CREDGATE_TOKEN",)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def environment(out: dict[str, Any], prefix: str) -> dict[str, str]:
    """The variables of one issued credential: its type's conventional names, else PREFIX+KEY."""
    from gateway.cli.cred import env_name

    cred = out.get("credential") or {}
    mapping = ENV_MAPS.get(out.get("connector_type") or "")
    env: dict[str, str] = {}
    if mapping is None:
        for key, value in cred.items():
            env[env_name(key, prefix)] = value
        return env
    for key, var in mapping:
        if key in cred and var not in env:
            env[var] = cred[key]
    return env


def _spec(text: str) -> tuple[str, str | None]:
    connector, _, resource = text.partition(":")
    if not connector or (":" in text and not resource):
        raise UsageProblem(f"{text!r}: expected CONNECTOR or CONNECTOR:RESOURCE (e.g. pg:analytics)")
    return connector, resource or None


class _Leases:
    """The leases issued for CMD: renewed while it runs, revoked at the end."""

    def __init__(self, c: Any) -> None:
        self.c = c
        self.items: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def issue(self, connector: str, resource: str | None, ttl: int | None) -> dict[str, Any]:
        from gateway.cli.cred import unwrapped
        from gateway.client.errors import RequestFailed

        if resource is None:
            resource = self._only_resource(connector)
        body: dict[str, Any] = {"connector": connector, "resource": resource, "ttl_seconds": ttl}
        try:
            out = self.c.request("POST", "/v1/credentials", json=body)
        except RequestFailed as exc:
            if exc.code != "wrap_required":
                raise
            # A wrap-only connector (static): this process is the consumer, so unwrap at once.
            out = self.c.request("POST", "/v1/credentials", json={**body, "wrap": True})
            with self.lock:
                self.items.append(out)
            out = {**out, **unwrapped(out["wrap_token"])}
            return out
        with self.lock:
            self.items.append(out)
        return out

    def _only_resource(self, connector: str) -> str:
        row = self.c.get(f"/v1/connectors/{seg(connector)}")
        exact = [r for r in row.get("resources", []) if "*" not in r]
        if len(row.get("resources", [])) != 1 or len(exact) != 1:
            raise UsageProblem(f"connector {connector} has several resources (or a pattern): name one, {connector}:RESOURCE")
        return exact[0]

    def renew_loop(self) -> None:
        """Renew each renewable lease when two thirds of its current TTL has passed."""
        import time
        from datetime import UTC, datetime

        from gateway.client.errors import GatewayUnreachable, RequestFailed

        def remaining(lease: dict[str, Any]) -> float:
            when = datetime.fromisoformat(str(lease["expires_at"]).replace("Z", "+00:00"))
            return (when - datetime.now(UTC)).total_seconds()

        period = {x["lease_id"]: max(remaining(x), 3.0) for x in self.items if x.get("renewable")}
        due = {lease_id: time.monotonic() + p * 2 / 3 for lease_id, p in period.items()}
        while due and not self.stop.wait(min(1.0, max(0.05, min(due.values()) - time.monotonic()))):
            for lease_id, at in list(due.items()):
                if time.monotonic() < at or self.stop.is_set():
                    continue
                try:
                    out = self.c.request("POST", f"/v1/leases/{seg(lease_id)}/renew", json={"ttl_seconds": None})
                    left = max(remaining(out), 0.0)
                    due[lease_id] = time.monotonic() + max(left * 2 / 3, 1.0)
                    if left < 2:  # at its max: nothing more to renew
                        del due[lease_id]
                except RequestFailed as exc:
                    sys.stderr.write(f"credgate exec: could not renew {lease_id}: {exc.code}\n")
                    del due[lease_id]
                except GatewayUnreachable:
                    due[lease_id] = time.monotonic() + 2.0  # try again shortly

    def revoke_all(self) -> list[str]:
        """Revoke every lease; the ones that could not be revoked (they expire on their own)."""
        from gateway.client.errors import GatewayUnreachable, RequestFailed

        failed = []
        with self.lock:
            items, self.items = self.items, []
        for lease in items:
            try:
                self.c.request("POST", f"/v1/leases/{seg(lease['lease_id'])}/revoke")
            except (RequestFailed, GatewayUnreachable) as exc:
                failed.append(f"{lease['lease_id']} ({getattr(exc, 'code', type(exc).__name__)})")
        return failed


class _ExecCommand(TyperGroup):
    """``credgate exec``: one command whose arguments after ``--`` are CMD's, untouched."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            args, ctx.meta["credgate_exec_cmd"] = args[:i], args[i + 1:]
        else:
            ctx.meta["credgate_exec_cmd"] = []
        return super().parse_args(ctx, args)


exec_app = typer.Typer(
    cls=_ExecCommand, invoke_without_command=True, no_args_is_help=True, add_completion=False,
    subcommand_metavar="-- CMD [ARGS]...",
    rich_markup_mode=None, pretty_exceptions_enable=False,
    help="Run a command with short-lived credentials in its environment; revoke them when it ends.",
)


@exec_app.callback()
def exec_command(
    ctx: typer.Context,
    specs: Annotated[list[str], typer.Argument(metavar="CONNECTOR[:RESOURCE]...", show_default=False)],
    ttl: Annotated[str | None, typer.Option("--ttl", help="e.g. 15m, for every credential; capped at each connector's max.")] = None,
    prefix: Annotated[str, typer.Option(
        "--prefix", help="Variable prefix for credentials of types without conventional names (static...).")] = "CREDGATE_",
) -> None:
    """Run CMD with the credentials in its environment (postgres: PGHOST PGPORT PGUSER PGPASSWORD
    PGDATABASE; mysql: MYSQL_HOST MYSQL_TCP_PORT MYSQL_USER MYSQL_PWD MYSQL_DATABASE; redis:
    REDIS_URL; aws: AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_REGION; others:
    PREFIX+KEY, e.g. CREDGATE_API_KEY). Renewable leases are renewed while CMD runs; every lease
    is revoked when it ends. Exit code: CMD's, or 128+N if it died of signal N."""
    cmd: list[str] = ctx.meta.get("credgate_exec_cmd") or []
    if not cmd:
        raise UsageProblem("give the command after --: credgate exec CONNECTOR[:RESOURCE]... -- CMD [ARGS]...")
    wanted = [_spec(s) for s in specs]
    seconds = parse_duration(ttl)
    raise typer.Exit(_run(wanted, seconds, prefix, cmd))


def _run(wanted: list[tuple[str, str | None]], ttl: int | None, prefix: str, cmd: list[str]) -> int:
    got: list[int] = []  # a signal received (before or while CMD runs)
    child: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: Any) -> None:
        got.append(signum)
        if child and child[0].poll() is None:
            try:
                child[0].send_signal(signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, on_signal) for s in FORWARDED}
    with client() as c:
        leases = _Leases(c)
        try:
            env = {k: v for k, v in os.environ.items() if k not in WITHHELD}
            added: dict[str, str] = {}
            for connector, resource in wanted:
                if got:
                    return 128 + got[0]
                for var, value in environment(leases.issue(connector, resource, ttl), prefix).items():
                    if var in added:
                        raise UsageProblem(f"two credentials set {var}: run them in separate commands (or use --prefix)")
                    added[var] = value
            if got:
                return 128 + got[0]
            env.update(added)
            try:
                child.append(subprocess.Popen(cmd, env=env))
            except OSError as exc:
                sys.stderr.write(f"credgate: can't run {cmd[0]}: {exc.strerror}\n")
                return 127 if isinstance(exc, FileNotFoundError) else 126
            renewer = threading.Thread(target=leases.renew_loop, name="credgate-renew", daemon=True)
            renewer.start()
            while True:
                try:
                    code = child[0].wait()
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                    continue
            leases.stop.set()
            renewer.join(timeout=5)
            return 128 - code if code < 0 else code
        finally:
            leases.stop.set()
            failed = leases.revoke_all()
            if failed:
                sys.stderr.write(f"credgate exec: could not revoke {', '.join(failed)}; they expire on their own\n")
            for s, handler in previous.items():
                signal.signal(s, handler)
