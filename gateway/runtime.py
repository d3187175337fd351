"""The running gateway's parts, built once at start-up and shared by every request."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from gateway.audit.trail import AuditLog, build_sinks
from gateway.identity.principal import AdminKeys, new_token
from gateway.identity.authenticator import Authenticator
from gateway.plugins.connectors import Catalog, PoolLimits
from gateway.identity.clients import Clients
from gateway.issuing.service import Credentials, RevokePolicy
from gateway.crypto.envelope import Envelope
from gateway.errors import ConfigurationError, CredgateError
from gateway.identity.issuers import TrustedIssuers
from gateway.crypto.keyring import KeyRing, load_keyring
from gateway.crypto.kmsring import KmsKeyRing
from gateway.issuing.leases import Leases
from gateway.plugins.backends import Mounts
from gateway.policy.store import Policies
from gateway.issuing.reaper import Reaper
from gateway.crypto.rotation import KeyManager
from gateway.identity.runs import Runs
from gateway.settings import Settings
from gateway.identity.signing import SigningKeys
from gateway.store import Store
from gateway.identity.tokens import Tokens
from gateway.identity.workload import WebIdentityTokens
from gateway.issuing.wrapping import WrapTokens

log = logging.getLogger("credgate")


def keyring_for(settings: Settings, *, probe: bool = True) -> KeyRing:
    """Load (in dev mode: create) the KEK the settings point to, or raise ConfigurationError.

    A KEK held by a KMS (``kek_source`` aws-kms or vault-transit) is built without I/O and
    loaded by :meth:`Runtime.start`; with ``probe`` (``credgate serve``, before the server
    starts, outside any event loop) the KMS is asked once to wrap and unwrap a random
    value, so an unreachable KMS, a wrong key or a refused permission is one line, exit 2."""
    if settings.kek_source in ("aws-kms", "vault-transit"):
        ring = KmsKeyRing(kek_source_for(settings), grace_seconds=settings.kek_kms_grace_seconds)
        if probe:
            asyncio.run(ring.probe())
        return ring
    if settings.dev:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_keyring(
        kek_file=settings.kek_file,
        kek=settings.kek.get_secret_value() if settings.kek else None,
        dev=settings.dev,
        dev_file=settings.dev_kek_file,
    )


def kek_source_for(settings: Settings) -> Any:
    """The KMS client (a :class:`kms.base.KekSource`) the ``kek_*`` settings describe."""
    from gateway.plugins.registry import kek_source_class

    name = settings.kek_source or ""
    try:
        cls = kek_source_class(name)
    except CredgateError as exc:
        raise ConfigurationError(f"kek_source={name}: {exc.message}") from None
    if name == "aws-kms":
        options: dict[str, Any] = dict(
            key_id=settings.kek_aws_key_id, region=settings.kek_aws_region, endpoint_url=settings.kek_aws_endpoint_url
        )
    else:
        options = dict(
            url=settings.kek_vault_url, mount=settings.kek_vault_mount, key=settings.kek_vault_key,
            token=settings.kek_vault_token, token_file=settings.kek_vault_token_file,
            namespace=settings.kek_vault_namespace, ca_cert=settings.kek_vault_ca_cert,
        )
    try:
        config = cls.config_model(**{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError; its messages never quote a token
        errors = getattr(exc, "errors", lambda: [])()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise ConfigurationError(f"kek_source={name}: {where}: {first.get('msg', 'invalid')}") from None
    return cls(config, timeout=settings.kek_kms_timeout_seconds)


def check_bootstrap_file(settings: Settings) -> None:
    """Refuse (ConfigurationError, one line) a ``bootstrap_token_file`` that can't be written
    safely: its directory missing, or the file there already and readable by group or others."""
    path = settings.bootstrap_token_file
    if path is None:
        return
    if not path.parent.is_dir():
        raise ConfigurationError(f"bootstrap_token_file: the directory {path.parent} does not exist")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(f"bootstrap_token_file {path} exists and is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigurationError(
            f"bootstrap_token_file {path} exists with mode {stat.S_IMODE(st.st_mode):o}: group or others can read it; "
            f"remove it (a new token is written with mode 600)"
        )


async def _bootstrap(admin_keys: AdminKeys, settings: Settings) -> None:
    """The first admin key of an empty store, and where its token goes.

    CREDGATE_BOOTSTRAP_TOKEN: that token, nothing printed. CREDGATE_BOOTSTRAP_TOKEN_FILE: a
    generated token, written there (mode 0600, atomically: the file appears whole or not at
    all, and only once the key exists), never printed. Neither, in --dev: printed once on
    stdout, for the person at the terminal. Neither, outside --dev (a service, a container
    whose output is a log): no key is made, and a warning says what to set.
    """
    if settings.bootstrap_token is not None:
        if await admin_keys.bootstrap(settings.bootstrap_token.get_secret_value()) is not None:
            log.info("bootstrap admin key created from CREDGATE_BOOTSTRAP_TOKEN")
        return
    path = settings.bootstrap_token_file
    if path is not None:
        check_bootstrap_file(settings)
        token = new_token()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
                f.flush()
                os.fsync(f.fileno())
            if await admin_keys.bootstrap(token) is not None:
                os.replace(tmp, path)
                log.info("bootstrap admin token written to %s (mode 600)", path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    if settings.dev:
        token = await admin_keys.bootstrap(None)
        if token is not None:
            # Printed once, on a line of its own, straight to stdout (not to the log).
            sys.stdout.write(f"CREDGATE_TOKEN={token}\n")
            sys.stdout.flush()
        return
    if not await admin_keys.list():
        log.warning(
            "the store has no admin key, and none was made: outside --dev a generated token is never printed. "
            "Set CREDGATE_BOOTSTRAP_TOKEN (cgt_ and 28+ characters you choose) or CREDGATE_BOOTSTRAP_TOKEN_FILE "
            "(where to write a generated one) and restart"
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
    metrics: Any = None  # gateway.web.metrics.Metrics, set by the app

    @classmethod
    async def start(cls, settings: Settings, *, workers: int = 1, prepare: bool = False) -> Runtime:
        """Build and start the gateway's parts for one process.

        ``workers`` > 1: this process is one of that many workers of one ``credgate serve``
        (gateway/cli/workers.py): the store is shared with the other workers (see
        :class:`Store`), its PostgreSQL pool is this worker's share of ``database_pool_size``,
        and the migrations and the first-run set-up are left to the parent, which ran them
        once with ``prepare`` (then no background work starts: the parent closes it at once).
        """
        keyring = keyring_for(settings, probe=False)
        store = Store(settings.store_url, pool_size=-(-settings.database_pool_size // workers),
                      max_overflow=-(-10 // workers),
                      connect_timeout=settings.database_connect_timeout_seconds,
                      statement_timeout=settings.database_statement_timeout_seconds,
                      stale_seconds=settings.cache_stale_seconds, shared=workers > 1)
        first_run = workers == 1 or prepare
        try:
            store.claim_sole_use()
            if first_run:
                await asyncio.to_thread(store.upgrade)
            await store.changes.start()
            if isinstance(keyring, KmsKeyRing):
                await keyring.open(store)  # ConfigurationError naming the source if the KMS can't unwrap
            envelope = Envelope(keyring)
            mounts = Mounts(store, envelope, timeout=settings.backend_timeout_seconds)
            signing = SigningKeys(store, envelope)
            catalog = Catalog(
                store, mounts, material_seconds=settings.material_cache_seconds,
                pool=PoolLimits(
                    size=settings.target_pool_size,
                    wait_seconds=settings.target_pool_wait_seconds,
                    idle_seconds=settings.target_pool_idle_seconds,
                ),
                identity=lambda name: WebIdentityTokens(signing, settings.issuer_url, name),
            )
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
                delivery_deadline=(timedelta(seconds=settings.delivery_deadline_seconds)
                                   if settings.delivery_deadline_seconds else None),
            )
            admin_keys = AdminKeys(store)
            tokens = Tokens(signing, settings.issuer_url)
            issuers = TrustedIssuers(store)
            policies = Policies(store)
            runs = Runs(store, tokens, max_ttl=timedelta(seconds=settings.run_token_max_ttl_seconds))
            rt = cls(
                audit=AuditLog(store, envelope, signing, build_sinks(settings.audit_sinks),
                               wait_seconds=settings.audit_wait_seconds,
                               checkpoint_every=settings.audit_checkpoint_every,
                               checkpoint_seconds=settings.audit_checkpoint_seconds),
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
                    leader_ttl=settings.reaper_leader_ttl_seconds,
                    revoke_undelivered=settings.delivery_deadline_seconds > 0,
                ),
            )
            rt.reaper.audit = rt.audit  # the reaper's revocations are audited
            await rt.keys.sync()
            await rt.mounts.ensure_builtin()
            await rt.signing.ensure()
            await rt.audit.start()
            if first_run:
                await _bootstrap(rt.admin_keys, settings)
            if prepare:
                return rt
            if await rt.keys.needs_rewrap():
                log.info("data keys under an older KEK version found; resuming re-wrap")
                rt.keys.start_rewrap()
            if isinstance(keyring, KmsKeyRing):
                rt.keys.start_following(settings.kek_check_seconds)
            if settings.reaper_enabled:
                rt.reaper.start()
                if settings.audit_retention_days > 0:  # one replica prunes: the reaper's leader
                    rt.audit.keep(settings.audit_retention_days, settings.audit_archive_path,
                                  every_seconds=settings.audit_retention_check_seconds,
                                  leading=lambda: rt.reaper.is_leader)
        except BaseException:
            if isinstance(keyring, KmsKeyRing):
                await keyring.aclose()
            await store.aclose()
            raise
        return rt

    async def aclose(self) -> None:
        await self.reaper.stop()
        await self.audit.aclose()  # queued events land, the head is checkpointed
        await self.keys.aclose()
        if isinstance(self.keyring, KmsKeyRing):
            await self.keyring.aclose()
        await self.catalog.aclose()  # connector instances it keeps (their admin connections)
        await self.mounts.aclose()
        await self.store.aclose()
