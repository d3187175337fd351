"""A KEK held by a customer's KMS (``CREDGATE_KEK_SOURCE=aws-kms`` or ``vault-transit``).

The key hierarchy::

    KMS key (never leaves the KMS; versioned by the KMS)
      └─ wraps each KEK version: 32 random bytes, stored wrapped in kek_versions.wrapped_key
           └─ wraps each record's data key (AES-256-GCM, gateway/crypto/envelope.py)

A :class:`KmsKeyRing` is a :class:`~gateway.crypto.keyring.KeyRing` like the file
KEK: it wraps and unwraps data keys locally, with KEK versions it holds in memory.
What differs is where the versions come from: the store holds them wrapped by a
:class:`~kms.base.KekSource` (built by the runtime from ``gateway.plugins.registry``;
this package imports no vendor SDK), and the key ring asks the KMS to unwrap each
one once: at start-up (:meth:`open`), or when another replica made a newer one
(:meth:`load_new`). A secret read or write therefore makes **no KMS call**; the
unwrapped versions live in this process's memory exactly as long as a file KEK does.

Rules:

- Start-up needs the KMS: unreachable, a wrong key, refused credentials or a missing
  permission is a :class:`~gateway.errors.ConfigurationError` naming the source.
  An empty store gets KEK version 1 from here.
- The current KEK version is the store's newest. A process that has not unwrapped it
  yet (another replica made it while this one could not reach the KMS) refuses to
  wrap under an older one: the write fails with 503 ``kms_unavailable`` and
  ``Retry-After`` before anything is written, and the key ring retries by itself.
- Following the KMS key: :class:`~gateway.crypto.rotation.KeyManager` asks the KMS
  for its key version every ``kek_check_seconds``; when it moved (a KMS rotation, or
  an alias pointed at another key) it makes a new KEK version wrapped under the new
  KMS key version, re-wraps every record to it in the background (the same re-wrap as
  a file KEK rotation), and re-wraps the older KEK versions' blobs under the new KMS
  key version, so the old one can then be retired at the KMS.
- ``grace_seconds`` > 0 (``kek_kms_grace_seconds``) makes the KMS an off switch: once
  the KMS has not answered for that long (revoked access, disabled key, outage),
  wraps and unwraps fail with 503 ``kms_unavailable`` until it answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway.crypto.keyring import KEY_BYTES, NONCE_BYTES, DecryptionFailed
from gateway.errors import ConfigurationError, Conflict, CredgateError, TargetUnreachable, Unavailable
from gateway.store import Store
from gateway.store.models import KekVersion, utcnow

if TYPE_CHECKING:
    from kms.base import KekSource

log = logging.getLogger("credgate.kms")


class KmsUnavailable(Unavailable):
    """The KMS holding the KEK did not answer (or refused): nothing was written."""

    code = "kms_unavailable"
    retry_after = 5


def kek_context(version: int) -> dict[str, str]:
    """What a KEK version's wrap is bound to at the KMS (AWS encryption context,
    transit associated data): the blob of one version can't stand in for another."""
    return {"credgate": "kek", "kek_version": str(version)}


@dataclass
class _Stored:
    fingerprint: str
    blob: bytes
    kms_version: str


class KmsKeyRing:
    """KEK versions wrapped by a KMS key, unwrapped once each and held in memory."""

    def __init__(self, source: KekSource, *, grace_seconds: float = 0.0) -> None:
        self.source = source
        self.grace_seconds = grace_seconds
        self._store: Store | None = None
        self._keys: dict[int, bytes] = {}
        self._stored: dict[int, _Stored] = {}
        self._kms_version: str | None = None
        self._confirmed = time.monotonic()
        self._watching = False  # grace counts only once something asks the KMS periodically
        self._lock: asyncio.Lock | None = None
        self.wake = asyncio.Event()  # set when a wrap/unwrap needed the KMS: the follower looks at once
        self.last_error: str | None = None

    # --- the KeyRing protocol (synchronous, no I/O) ---------------------------------------

    @property
    def description(self) -> str:
        now = f", key version {self._kms_version}" if self._kms_version else ""
        return f"{self.source.description}{now}"

    def versions(self) -> list[int]:
        return sorted(self._keys)

    @property
    def current_version(self) -> int:
        if not self._stored:
            raise KmsUnavailable(f"The KEK has not been loaded from {self.source.description} yet.")
        return max(self._stored)

    def _key(self, version: int) -> bytes:
        if self._watching and self.grace_seconds and time.monotonic() - self._confirmed > self.grace_seconds:
            self.wake.set()
            raise KmsUnavailable(
                f"{self.source.description} has not answered for over {self.grace_seconds:g} s "
                "(kek_kms_grace_seconds); the KEK is not used until it does. Nothing was written."
            )
        key = self._keys.get(version)
        if key is None:
            self.wake.set()
            why = self.last_error or "it has not answered yet"
            raise KmsUnavailable(
                f"KEK version {version} is held by {self.source.description} and this gateway has not "
                f"unwrapped it yet ({why}); it retries by itself. Nothing was written."
            )
        return key

    def fingerprint(self, version: int) -> str:
        return _fingerprint(self._key(version))

    def wrap(self, version: int, dek: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(self._key(version)).encrypt(nonce, dek, aad)

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        key = self._key(version)
        try:
            return AESGCM(key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed("a data key failed to authenticate under its KEK") from None

    def can_add_version(self) -> bool:
        return True

    def add_version(self) -> int:
        raise Conflict("A KMS-held KEK gets new versions through `credgate keys rotate` (create_version), "
                       "which needs the KMS.", code="kek_needs_kms")

    def reload(self) -> None:
        """Nothing to re-read synchronously: :meth:`load_new` picks up new versions."""

    # --- the KMS side (async) ---------------------------------------------------------------

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _confirm(self) -> None:
        self._confirmed = time.monotonic()
        self.last_error = None

    def watch(self) -> None:
        """The follower starts asking the KMS every ``kek_check_seconds``: from now on a KMS
        silent for ``grace_seconds`` stops the KEK. Before that (start-up, between :meth:`open`
        and the follower) the KMS has just answered and nothing asks it again, so a slow start
        is not mistaken for a silent KMS."""
        self._confirmed = time.monotonic()
        self._watching = True

    async def probe(self) -> None:
        """Check that the KMS answers and lets this gateway use the key: its version, and a
        wrap and unwrap of a random value (``credgate serve`` runs it before starting).
        Raises ConfigurationError (one line, naming the source). Closes the client."""
        try:
            await self.source.key_version()
            value = secrets.token_bytes(KEY_BYTES)
            context = {"credgate": "probe"}
            if await self.source.unwrap((await self.source.wrap(value, context)).blob, context) != value:
                raise ConfigurationError(f"{self.source.description} unwrapped a probe to another value")
        except ConfigurationError:
            raise
        except CredgateError as exc:
            raise self._cannot_start(exc) from None
        finally:
            await self.source.aclose()

    def _cannot_start(self, exc: CredgateError) -> ConfigurationError:
        return ConfigurationError(
            f"the KEK can't be loaded: {exc.message.rstrip('.')}; refusing to start "
            f"(CREDGATE_KEK_SOURCE={self.source.type})"
        )

    async def open(self, store: Store) -> None:
        """Start-up: unwrap every KEK version the store holds (one KMS call each), or make
        version 1 in an empty store. Raises ConfigurationError (one line, naming the source)."""
        self._store = store
        try:
            async with self._guard():
                self._kms_version = await self.source.key_version()
                await self._load(at_start=True)
                if not self._stored:
                    await self._create()
            self._confirm()
        except ConfigurationError:
            raise
        except CredgateError as exc:
            raise self._cannot_start(exc) from None

    async def _load(self, *, at_start: bool = False) -> None:
        assert self._store is not None
        async with self._store.read() as s:
            rows = list((await s.execute(select(KekVersion).order_by(KekVersion.version))).scalars())
        foreign = [r.version for r in rows if r.wrapped_key is None]
        if foreign:
            raise ConfigurationError(
                f"this store's KEK version(s) {foreign} come from a KEK file or CREDGATE_KEK, not from "
                f"{self.source.description}; start it with that KEK (moving a store to a KMS-held KEK is not supported)"
            )
        for r in rows:
            assert r.wrapped_key is not None
            self._stored[r.version] = _Stored(r.fingerprint, r.wrapped_key, r.kms_key_version or "")
        newest = max(self._stored, default=0)
        failed: CredgateError | None = None
        unwrapped = False
        for version in sorted(self._stored, reverse=True):
            if version in self._keys:
                continue
            stored = self._stored[version]
            try:
                key = await self.source.unwrap(stored.blob, kek_context(version))
            except TargetUnreachable:
                raise
            except CredgateError as exc:
                if at_start and version == newest:
                    raise
                # An older version the KMS no longer opens (e.g. below min_decryption_version):
                # fine unless records still need it (KeyManager.sync refuses to start then).
                log.warning("KEK version %d does not unwrap (%s)", version, exc.code)
                failed = failed or exc
                continue
            if len(key) != KEY_BYTES or not hmac.compare_digest(_fingerprint(key), stored.fingerprint):
                raise ConfigurationError(
                    f"KEK version {version} unwrapped by {self.source.description} is not the key this store "
                    "was written with (fingerprint mismatch); refusing to use it"
                )
            self._keys[version] = key
            unwrapped = True
        if unwrapped:
            self._confirm()
        if failed is not None:
            self.last_error = failed.code

    async def _create(self) -> int:
        assert self._store is not None
        version = max(self._stored, default=0) + 1
        key = secrets.token_bytes(KEY_BYTES)
        wrapped = await self.source.wrap(key, kek_context(version))
        self._confirm()
        try:
            async with self._store.write() as s:
                s.add(KekVersion(version=version, fingerprint=_fingerprint(key), state="active", created_at=utcnow(),
                                 wrapped_key=wrapped.blob, kms_key_version=wrapped.key_version))
        except IntegrityError:  # another replica made this version first: use theirs
            await self._load()
            return max(self._stored)
        self._stored[version] = _Stored(_fingerprint(key), wrapped.blob, wrapped.key_version)
        self._keys[version] = key
        self._kms_version = wrapped.key_version
        log.info("KEK version %d made, wrapped by %s", version, self.description)
        await self._rewrap_older()
        return version

    async def _rewrap_older(self) -> None:
        """Wrap the older KEK versions held here under the KMS key's current version
        (from memory: Encrypt/encrypt only), so the KMS's old key version is no longer needed."""
        assert self._store is not None
        current = self._kms_version
        for version in sorted(self._keys):
            stored = self._stored[version]
            if not current or stored.kms_version == current:
                continue
            wrapped = await self.source.wrap(self._keys[version], kek_context(version))
            async with self._store.write() as s:
                row = await s.get(KekVersion, version)
                if row is not None:
                    row.wrapped_key, row.kms_key_version = wrapped.blob, wrapped.key_version
            self._stored[version] = _Stored(stored.fingerprint, wrapped.blob, wrapped.key_version)
            log.info("KEK version %d re-wrapped under KMS key version %s", version, wrapped.key_version)

    async def load_new(self) -> None:
        """Pick up KEK versions other replicas made, and unwrap any not unwrapped yet.
        Raises KmsUnavailable while the current version stays out of reach."""
        async with self._guard():
            try:
                await self._load()
            except CredgateError as exc:
                if isinstance(exc, ConfigurationError):
                    raise
                self.last_error = exc.code
            if self._stored and self.current_version not in self._keys:
                why = self.last_error or "it did not answer"
                raise KmsUnavailable(
                    f"KEK version {self.current_version} can't be unwrapped by {self.source.description} ({why})."
                )

    async def create_version(self) -> int:
        """A new KEK version wrapped under the KMS key's current version (the store's newest
        from now on); older versions' blobs follow the KMS key too. KmsUnavailable if the
        KMS does not answer or refuses: nothing is written then."""
        async with self._guard():
            try:
                self._kms_version = await self.source.key_version()
                return await self._create()
            except CredgateError as exc:
                if isinstance(exc, (ConfigurationError, Unavailable)):
                    raise
                self.last_error = exc.code
                raise KmsUnavailable(f"A new KEK version can't be made: {exc.message}") from None

    async def check_kms(self) -> bool:
        """Ask the KMS for its key's current version (a proof of life for ``grace_seconds``);
        re-wrap older versions still under an older KMS key version; return whether the KMS
        key moved past the version the current KEK version is wrapped under."""
        async with self._guard():
            try:
                self._kms_version = await self.source.key_version()
            except CredgateError as exc:
                self.last_error = exc.code
                raise KmsUnavailable(f"The KMS key can't be checked: {exc.message}") from None
            self._confirm()
            if not self._stored:
                return False
            moved = self._stored[self.current_version].kms_version != self._kms_version
            if not moved:
                try:
                    await self._rewrap_older()
                except CredgateError as exc:
                    self.last_error = exc.code
            return moved

    async def aclose(self) -> None:
        await self.source.aclose()


def _fingerprint(key: bytes) -> str:
    return hmac.new(key, b"credgate kek fingerprint v1", hashlib.sha256).hexdigest()[:16]

