"""The running gateway's parts, built once at start-up and shared by every request."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from gateway.audit import AuditLog, build_sinks
from gateway.auth import AdminKeys
from gateway.authenticator import Authenticator
from gateway.catalog import Catalog
from gateway.clients import Clients
from gateway.credentials import Credentials, RevokePolicy
from gateway.envelope import Envelope
from gateway.identity import TrustedIssuers
from gateway.keyring import KeyRing, load_keyring
from gateway.leases import Leases
from gateway.mounts import Mounts
from gateway.policies import Policies
from gateway.reaper import Reaper
from gateway.rotation import KeyManager
from gateway.runs import Runs
from gateway.settings import Settings
from gateway.signing import SigningKeys
from gateway.store import Store
from gateway.tokens import Tokens
from gateway.wrapping import WrapTokens

log = logging.getLogger("credgate")


def keyring_for(settings: Settings) -> KeyRing:
    """Load (in dev mode: create) the KEK the settings point to, or raise ConfigurationError."""
    if settings.dev:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_keyring(
        kek_file=settings.kek_file,
        kek=settings.kek.get_secret_value() if settings.kek else None,
        dev=settings.dev,
        dev_file=settings.dev_kek_file,
    )


@dataclass
class Runtime:
    settings: Settings
    store: Store
    keyring: KeyRing
    envelope: Envelope
    mounts: Mounts
    keys: KeyManager
    admin_keys: AdminKeys
    catalog: Catalog
    leases: Leases
    credentials: Credentials
    reaper: Reaper
    signing: SigningKeys
    tokens: Tokens
    issuers: TrustedIssuers
    clients: Clients
    policies: Policies
    runs: Runs
    authenticator: Authenticator
    audit: AuditLog
    metrics: Any = None  # gateway.metrics.Metrics, set by the app

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        keyring = keyring_for(settings)
        store = Store(settings.store_url, pool_size=settings.database_pool_size)
        try:
            store.claim_sole_use()
            await asyncio.to_thread(store.upgrade)
            await store.changes.start()
            envelope = Envelope(keyring)
            mounts = Mounts(store, envelope)
            catalog = Catalog(store, mounts, material_seconds=settings.material_cache_seconds)
            mounts.in_use_by = catalog.count_using_backend
            leases = Leases(store)
            wraps = WrapTokens(store, envelope)
            credentials = Credentials(
                store, envelope, catalog, leases, wraps,
                RevokePolicy(
                    timeout=settings.target_timeout_seconds,
                    backoff_base=settings.revoke_backoff_base_seconds,
                    backoff_cap=settings.revoke_backoff_cap_seconds,
                ),
            )
            admin_keys = AdminKeys(store)
            signing = SigningKeys(store, envelope)
            tokens = Tokens(signing, settings.issuer_url)
            issuers = TrustedIssuers(store)
            policies = Policies(store)
            runs = Runs(store, tokens, max_ttl=timedelta(seconds=settings.run_token_max_ttl_seconds))
            rt = cls(
                audit=AuditLog(store, envelope, signing, build_sinks(settings.audit_sinks),
                               wait_seconds=settings.audit_wait_seconds,
                               checkpoint_every=settings.audit_checkpoint_every),
                signing=signing,
                tokens=tokens,
                issuers=issuers,
                clients=Clients(store),
                policies=policies,
                runs=runs,
                authenticator=Authenticator(admin_keys, tokens, issuers, runs, policies),
                settings=settings,
                store=store,
                keyring=keyring,
                envelope=envelope,
                mounts=mounts,
                keys=KeyManager(store, keyring, envelope),
                admin_keys=admin_keys,
                catalog=catalog,
                leases=leases,
                credentials=credentials,
                reaper=Reaper(
                    store, leases, credentials, wraps,
                    interval=settings.reaper_interval_seconds,
                    pending_timeout=settings.pending_timeout_seconds,
                ),
            )
            await rt.keys.sync()
            await rt.mounts.ensure_builtin()
            await rt.signing.ensure()
            await rt.audit.start()
            token = await rt.admin_keys.bootstrap(
                settings.bootstrap_token.get_secret_value() if settings.bootstrap_token else None
            )
            if token is not None and settings.bootstrap_token is None:
                # Printed once, on a line of its own, straight to stdout (not to the log).
                sys.stdout.write(f"CREDGATE_TOKEN={token}\n")
                sys.stdout.flush()
            elif token is not None:
                log.info("bootstrap admin key created from CREDGATE_BOOTSTRAP_TOKEN")
            if await rt.keys.needs_rewrap():
                log.info("data keys under an older KEK version found; resuming re-wrap")
                rt.keys.start_rewrap()
            if settings.reaper_enabled:
                rt.reaper.start()
        except BaseException:
            await store.aclose()
            raise
        return rt

    async def aclose(self) -> None:
        await self.reaper.stop()
        await self.keys.aclose()
        await self.mounts.aclose()
        await self.store.aclose()
