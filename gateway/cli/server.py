"""``credgate serve`` and ``credgate db``: the server-side commands. They read the settings,
not the global --addr/--token, and import the server (``credgate[server]``) only when they run."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import UsageProblem, group, server_code

app = group("The gateway's store.")
GRACEFUL_SECONDS = 10  # in-flight requests get this long to finish at shutdown
log = logging.getLogger("credgate")

ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file.", exists=False, dir_okay=False)
]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")]


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
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=256,
                                 help="Worker processes [default: setting `workers`, else the CPUs available].")
    ] = None,
) -> None:
    """Run the gateway."""
    with server_code("serve"):
        import uvicorn

        from gateway.runtime import check_bootstrap_file, keyring_for
        from gateway.settings import load_settings
        from gateway.store.database import check_sole_use, sync_url
        from gateway.store.migrate import check_schema
        from gateway.web.app import create_app
        from gateway.web.logs import configure
        from gateway.web.tls import ServerTLS, uvicorn_options

    # SIGHUP reloads the TLS files once serving (GatewayServer); until then, and without TLS, it is ignored.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = load_settings(
        config, dev=dev or None, data_dir=data_dir, host=host, port=port, tls_cert_file=tls_cert,
        tls_key_file=tls_key, tls_client_ca_file=tls_client_ca, tls_require_client_cert=tls_require_client_cert or None,
        workers=workers,
    )
    configure(settings.log_format, settings.log_level)
    keyring_for(settings)  # fail fast, with one line, before the server starts
    check_bootstrap_file(settings)  # the same for where a generated admin token would go
    check_sole_use(settings.store_url)  # the same for a SQLite store another process serves
    check_schema(sync_url(settings.store_url))  # the same for a schema a newer, incompatible release wrote
    server_tls = ServerTLS(settings) if settings.tls_cert_file else None  # the same for certificate files
    tls = uvicorn_options(settings, server_tls)
    scheme = "https" if tls else "http"
    if settings.dev:
        typer.echo(f"credgate dev mode: data in {settings.data_dir}, listening on {scheme}://{settings.host}:{settings.port}")
    if settings.console:
        shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        typer.echo(f"console: {scheme}://{shown}:{settings.port}/console (sign in with an admin key"
                   + (" or at your identity provider)" if settings.login_issuer else ")"))
    from gateway.cli.workers import supervise, worker_count

    n = worker_count(settings)
    if n > 1:
        raise SystemExit(supervise(settings, n, _run_worker, graceful=GRACEFUL_SECONDS))
    web = create_app(settings)
    if server_tls is not None:
        web.state.metrics.watch_tls(server_tls)
    server = _gateway_server(uvicorn)(uvicorn_config(uvicorn, web, settings, tls), settings, server_tls)
    server.run()
    if not server.started or server.failed:
        raise SystemExit(3)  # what uvicorn.run exits with when start-up fails


def _run_worker(settings, index: int, workers: int, sock, ready, parent: int) -> None:  # noqa: ANN001
    """Worker ``index`` of ``workers`` (gateway/cli/workers.py): its own app and runtime on the
    parent's socket; the health listener in worker 0 only."""
    import uvicorn

    from gateway.web.app import create_app
    from gateway.web.logs import configure
    from gateway.web.tls import ServerTLS, uvicorn_options

    configure(settings.log_format, settings.log_level)
    server_tls = ServerTLS(settings) if settings.tls_cert_file else None
    web = create_app(settings, workers=workers, worker=index)
    if server_tls is not None:
        web.state.metrics.watch_tls(server_tls)
    config = uvicorn_config(uvicorn, web, settings, uvicorn_options(settings, server_tls))
    server = _gateway_server(uvicorn)(config, settings, server_tls, health=index == 0, ready=ready, parent=parent,
                                            worker=index)
    server.run(sockets=[sock])
    if not server.started or server.failed:
        raise SystemExit(3)


def uvicorn_config(uvicorn, web, settings, tls):  # noqa: ANN001, ANN201 - uvicorn is imported only when serving
    """The uvicorn Config every serving process uses."""
    return uvicorn.Config(
        web,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
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


def _gateway_server(uvicorn):  # noqa: ANN001, ANN202 - uvicorn is imported only when serving
    """uvicorn's Server, plus what the gateway runs beside it once started: the TLS
    reloads (SIGHUP, the file watcher) and the loopback health listener.

    As a worker of several (gateway/cli/workers.py): ``health`` False for all but worker 0
    (one health listener per serve), ``ready`` set once serving, and ``parent`` (its pid)
    watched: a worker whose parent is gone stops."""

    class GatewayServer(uvicorn.Server):
        def __init__(self, config, settings, server_tls, *, health: bool = True, ready=None,  # noqa: ANN001
                     parent: int | None = None, worker: int = 0) -> None:
            super().__init__(config)
            self.worker = worker
            self.settings = settings
            self.server_tls = server_tls
            self.serve_health = health
            self.ready = ready
            self.parent = parent
            self.health = None
            self.watcher = None
            self.orphan_watch = None
            self.failed = False  # something started beside uvicorn failed: stop, exit 3

        def _log_started_message(self, listeners) -> None:  # noqa: ANN001
            # uvicorn says https when it has a context; the handshakes are ServerTLS's (gateway/web/tls.py).
            if self.server_tls is None:
                return super()._log_started_message(listeners)
            self.config.ssl = self.server_tls.context
            try:
                super()._log_started_message(listeners)
            finally:
                self.config.ssl = None
            log.info("TLS certificate: %s", self.server_tls.loaded.describe())

        async def startup(self, sockets=None) -> None:  # noqa: ANN001
            await super().startup(sockets=sockets)
            if not self.started:
                return
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self.hangup)
            if self.server_tls is not None:
                self.watcher = loop.create_task(self.server_tls.watch(self.settings.tls_reload_check_seconds))
            if self.parent is not None:
                self.orphan_watch = loop.create_task(self._watch_parent())
            if self.settings.health_address is not None and self.serve_health:
                from gateway.web.routes.health import HealthListener

                host, port = self.settings.health_address
                self.health = HealthListener(self.config.app, host, port, self.lifespan.state)
                try:
                    await self.health.start()
                except OSError as exc:
                    log.error("can't listen on health_listen %s: %s", self.settings.health_listen, exc)
                    self.health, self.failed, self.should_exit = None, True, True
                    return
                log.info("health listener on http://%s (GET /healthz, /readyz)", self.settings.health_listen)
            if self.ready is not None:  # a worker: uvicorn said nothing of the socket it was given
                scheme = "https" if self.server_tls is not None else "http"
                log.info("worker %d (pid %d) serving on %s://%s:%d", self.worker, os.getpid(), scheme,
                         self.settings.host, self.settings.port)
                if self.server_tls is not None:
                    log.info("TLS certificate: %s", self.server_tls.loaded.describe())
                self.ready.set()

        async def _watch_parent(self) -> None:
            while os.getppid() == self.parent:
                await asyncio.sleep(1.0)
            log.warning("the credgate serve that started this worker is gone: stopping")
            self.should_exit = True

        def hangup(self) -> None:
            if self.server_tls is None:
                log.info("SIGHUP: no TLS files to reload (nothing else is reloaded)")
            else:
                self.server_tls.reload("SIGHUP")

        async def shutdown(self, sockets=None) -> None:  # noqa: ANN001
            if self.health is not None:
                await self.health.close()  # not ready any more while draining
            if self.watcher is not None:
                self.watcher.cancel()
            if self.orphan_watch is not None:
                self.orphan_watch.cancel()
            await super().shutdown(sockets=sockets)

    return GatewayServer


@app.command("upgrade")
def db_upgrade(config: ConfigFile = None, data_dir: DataDir = None) -> None:
    """Apply the store's migrations up to the newest."""
    with server_code("db upgrade"):
        from gateway.settings import load_settings
        from gateway.store.database import sync_url
        from gateway.store.migrate import current, upgrade

    settings = load_settings(config, data_dir=data_dir)
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    url = sync_url(settings.store_url)
    upgrade(url)
    typer.echo(f"store at revision {current(url)}")


@app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(metavar="REVISION", help="The revision to take the schema back to.")],
    config: ConfigFile = None,
    data_dir: DataDir = None,
) -> None:
    """Take the store's schema back to REVISION, before rolling back to the release that
    knows it (stop every gateway first; run it with the newer release)."""
    with server_code("db downgrade"):
        from alembic.script import ScriptDirectory

        from gateway.settings import load_settings
        from gateway.store.database import sync_url
        from gateway.store.migrate import alembic_config, current, downgrade

    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if revision not in known:
        raise UsageProblem(f"revision {revision!r} is not one this release knows ({', '.join(sorted(known))})")
    settings = load_settings(config, data_dir=data_dir)
    url = sync_url(settings.store_url)
    downgrade(url, revision)
    typer.echo(f"store at revision {current(url)}")
