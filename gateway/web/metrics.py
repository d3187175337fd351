"""Prometheus metrics at ``/metrics`` (prometheus-client, one registry per app).

Labels never carry request data: routes are labelled by their template
(``/v1/secrets/{backend}/{path:path}``), never by the path a caller sent.
Gauges that describe the store (leases by state, the revocation backlog) are
read when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send


BACKEND_CHECK_SECONDS = 15.0
BACKEND_CHECK_TIMEOUT = 2.0


class Metrics:
    def __init__(self, *, worker: int = 0) -> None:
        r = self.registry = CollectorRegistry()
        # Every count here is this process's: with `credgate serve --workers N` a scrape is
        # answered by one worker, and says which (scrape each, or sum over pid).
        Gauge("credgate_process", "The process (worker of credgate serve) answering this scrape.",
              ["worker", "pid"], registry=r).labels(str(worker), str(os.getpid())).set(1)
        self.requests = Counter("credgate_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("credgate_http_request_seconds", "HTTP request latency by route.",
                                 ["method", "route"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.issue_seconds = Histogram("credgate_issue_seconds", "Credential issuance latency by connector type.",
                                       ["connector_type"], registry=r,
                                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.leases = Gauge("credgate_leases", "Leases by state.", ["state"], registry=r)
        self.revocation_backlog = Gauge("credgate_revocation_backlog", "Leases waiting to be revoked.", registry=r)
        self.revocations_stuck = Gauge("credgate_revocations_stuck",
                                       "Revocations that failed at least stuck_after_attempts times.", registry=r)
        self.reaper_leader = Gauge("credgate_reaper_leader", "1 if this replica runs the reaper.", registry=r)
        self.reaper_takeovers = Counter("credgate_reaper_takeovers", "Times this replica became the reaper leader.",
                                        registry=r)
        self._takeovers_seen = 0
        self.undelivered_revoked = Counter(
            "credgate_leases_undelivered_revoked", "Leases this replica's reaper revoked because their response "
            "was never confirmed sent by the delivery deadline.", registry=r)
        self._undelivered_seen = 0
        self.audit_sink_up = Gauge("credgate_audit_sink_up", "1 if an audit sink accepts writes.", ["sink"], registry=r)
        self.backend_up = Gauge("credgate_backend_up", "1 if a secret backend answered its health check at the "
                                "last scrape (checked at most every BACKEND_CHECK_SECONDS).", ["backend"], registry=r)
        self._backends_checked = 0.0

    def watch_caches(self, feed) -> None:
        """Export the hit/miss counts of every cache fed by ``feed`` (a gateway.changes.Changes)."""
        self.registry.register(_CacheCollector(feed))

    def watch_pools(self, catalog) -> None:
        """Export the admin connection pools of the live connectors (gateway.plugins.connectors.Catalog)."""
        self.registry.register(_PoolCollector(catalog))

    def watch_tls(self, server_tls) -> None:
        """Export the served certificate's expiry and the TLS reload and handshake counts."""
        self.registry.register(_TLSCollector(server_tls))

    async def refresh(self, runtime) -> None:
        counts = await runtime.leases.counts(stuck_after_attempts=runtime.settings.stuck_after_attempts)
        for state in ("pending", "active", "revoking", "revoked", "expired"):
            self.leases.labels(state).set(counts[state])
        self.revocation_backlog.set(counts["revoking"])
        self.revocations_stuck.set(counts["stuck_revoking"])
        self.reaper_leader.set(1 if runtime.reaper.is_leader else 0)
        takeovers = runtime.reaper.takeovers
        if takeovers > self._takeovers_seen:
            self.reaper_takeovers.inc(takeovers - self._takeovers_seen)
            self._takeovers_seen = takeovers
        undelivered = runtime.reaper.undelivered_revoked
        if undelivered > self._undelivered_seen:
            self.undelivered_revoked.inc(undelivered - self._undelivered_seen)
            self._undelivered_seen = undelivered
        for name, health in runtime.audit.health.items():
            self.audit_sink_up.labels(name).set(1 if health.ok else 0)
        if time.monotonic() - self._backends_checked >= BACKEND_CHECK_SECONDS:
            # A vendor's secret manager is a network call away: don't let a scrape trigger more than
            # one round of checks per interval, nor wait on a slow backend for long.
            self._backends_checked = time.monotonic()
            for mount in await runtime.mounts.list():
                try:
                    health = await asyncio.wait_for(runtime.mounts.check(mount.name), BACKEND_CHECK_TIMEOUT)
                    ok = health.ok
                except Exception:  # noqa: BLE001 - a timeout or any failure is "down"
                    ok = False
                self.backend_up.labels(mount.name).set(1 if ok else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _CacheCollector:
    def __init__(self, feed) -> None:
        self._feed = feed

    def describe(self):
        return []

    def collect(self):
        lookups = CounterMetricFamily("credgate_cache_lookups", "Cache lookups by cache and result (hit rate).",
                                      labels=["cache", "result"])
        entries = GaugeMetricFamily("credgate_cache_entries", "Entries held by each cache.", labels=["cache"])
        for cache in self._feed.caches:
            lookups.add_metric([cache.name, "hit"], cache.hits)
            lookups.add_metric([cache.name, "miss"], cache.misses)
            entries.add_metric([cache.name], len(cache))
        yield lookups
        yield entries
        yield GaugeMetricFamily("credgate_change_feed_live",
                                "1 while this replica hears every change (caches serve); 0 while they are bypassed.",
                                value=1 if self._feed.live else 0)


class _PoolCollector:
    """Each live connector's pool of admin connections to its target (connectors.base.TargetPool).
    The counts start again when a connector's instance is replaced (its pool with it)."""

    def __init__(self, catalog) -> None:
        self._catalog = catalog

    def describe(self):
        return []

    def collect(self):
        conns = GaugeMetricFamily("credgate_target_pool_connections",
                                  "Admin connections of a connector's pool, in use (or opening) and idle.",
                                  labels=["connector", "state"])
        waiting = GaugeMetricFamily("credgate_target_pool_waiting",
                                    "Calls waiting for one of a connector's admin connections.", labels=["connector"])
        events = CounterMetricFamily("credgate_target_pool_events",
                                     "Admin connections opened, reused, replaced (broken while idle), discarded "
                                     "(after a failed call), and calls refused target_busy.",
                                     labels=["connector", "event"])
        for name, pool in self._catalog.pools():
            stats = pool.stats()
            conns.add_metric([name, "in_use"], stats["in_use"])
            conns.add_metric([name, "idle"], stats["idle"])
            waiting.add_metric([name], stats["waiting"])
            for event in ("opened", "reused", "replaced", "discarded", "busy"):
                events.add_metric([name, event], stats[event])
        yield conns
        yield waiting
        yield events


_MEMO = 2048


class MetricsMiddleware:
    """Counts requests and their latency by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled children, kept: prometheus_client's labels() takes a lock and builds a key per call.
        # Route templates (not paths) and statuses are finite; past _MEMO keys (odd methods) nothing more is kept.
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            counter = self._counted.get((method, route, status))
            if counter is None:
                counter = self.metrics.requests.labels(method, route, str(status))
                if len(self._counted) < _MEMO:
                    self._counted[(method, route, status)] = counter
            timer = self._timed.get((method, route))
            if timer is None:
                timer = self.metrics.latency.labels(method, route)
                if len(self._timed) < _MEMO:
                    self._timed[(method, route)] = timer
            counter.inc()
            timer.observe(time.perf_counter() - start)


class _TLSCollector:
    """The serving certificate's expiry and the live reloads (gateway/web/tls.py ServerTLS)."""

    def __init__(self, server_tls) -> None:
        self._tls = server_tls

    def describe(self):
        return []

    def collect(self):
        loaded = self._tls.loaded
        not_after = GaugeMetricFamily("credgate_tls_certificate_not_after_seconds",
                                      "notAfter (Unix time) of the certificate served (server) and the earliest of "
                                      "the client CA bundle (client_ca).", labels=["which"])
        not_after.add_metric(["server"], loaded.not_after.timestamp())
        if loaded.client_ca_not_after is not None:
            not_after.add_metric(["client_ca"], loaded.client_ca_not_after.timestamp())
        yield not_after
        reloads = CounterMetricFamily("credgate_tls_reloads", "Live reloads of the TLS files, by result.",
                                      labels=["result"])
        for result, n in sorted(self._tls.reloads.items()):
            reloads.add_metric([result], n)
        yield reloads
        refused = CounterMetricFamily("credgate_tls_handshakes_refused", "TLS handshakes that failed, by reason.",
                                      labels=["reason"])
        for reason, n in sorted(self._tls.refused.items()):
            refused.add_metric([reason], n)
        yield refused
