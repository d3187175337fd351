"""The app factory: ``create_app(settings)`` builds the FastAPI service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from gateway import __version__
from gateway import console as web_console
from gateway.console import routes as console_pages
from gateway.console.session import ConsoleHeaders
from gateway.web.deps import declare_bearer
from gateway.web.errors import ErrorOut, install_error_handlers
from gateway.web.middleware import AuditTrail, DeliveryConfirmation, RequestGuard
from gateway.web.metrics import Metrics, MetricsMiddleware
from gateway.web.ratelimit import Limit, Limiter
from gateway.web.routes import (
    admin_keys,
    audit,
    backends,
    connectors,
    console,
    credentials,
    health,
    identity,
    keys,
    leases,
    policies,
    secrets,
)
from gateway.runtime import Runtime
from gateway.settings import Settings

_ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 410, 413, 415, 422, 429, 431, 503)}


def create_app(settings: Settings, *, workers: int = 1, worker: int = 0) -> FastAPI:
    """The app of one process; ``worker`` of ``workers`` when ``credgate serve`` runs several
    (gateway/cli/workers.py; the migrations and first-run set-up are then the parent's)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = await Runtime.start(settings, workers=workers)
        app.state.runtime.metrics = app.state.metrics
        app.state.metrics.watch_caches(app.state.runtime.store.changes)
        app.state.metrics.watch_pools(app.state.runtime.catalog)
        try:
            yield
        finally:
            await app.state.runtime.aclose()

    app = FastAPI(
        title="credgate",
        version=__version__,
        summary="Secrets and service-connector gateway",
        lifespan=lifespan,
        responses=_ERRORS,
        # Starlette's redirect to the other spelling of a path builds its Location from the
        # request's Host header (an open redirect to any host a caller names): a path is
        # served only as written; the other spelling is a 404 route_not_found.
        redirect_slashes=False,
    )
    install_error_handlers(app)
    # The routers' paths don't overlap, so their order is only how soon a request finds its
    # route: the data path (secrets, credentials, leases) first, administration after.
    for module in (secrets, credentials, leases, health, identity, connectors, audit, backends, keys, admin_keys,
                   policies, console):
        app.include_router(module.router)
    if settings.console:  # the web console: pages, and its assets from the gateway itself
        app.include_router(console_pages.router)
        app.mount("/console/static", StaticFiles(directory=web_console.STATIC), name="console-static")
    declare_bearer(app)
    app.state.metrics = Metrics(worker=worker)
    app.add_middleware(AuditTrail)
    app.add_middleware(ConsoleHeaders)  # CSP, no framing, no-store: on every console page and sign-in route
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.state.limiter = Limiter()
    app.add_middleware(
        RequestGuard,
        max_body=settings.max_body_bytes,
        max_headers=settings.max_header_bytes,
        limiter=app.state.limiter,
        address_limit=Limit(settings.rate_per_address, settings.burst_per_address),
        trusted_proxies=settings.proxy_networks,
    )  # request ids before everything the app does
    # Outermost: it must see the server's own receive, to know whether the client is still there.
    app.add_middleware(DeliveryConfirmation)
    return app
