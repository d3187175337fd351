"""Envelope encryption: a fresh AES-256-GCM data key per record, wrapped by the KEK.

A record is sealed under a *context*: the tuple of names that say where it
lives (e.g. ``("secret", backend, path, version)``). The context is the
associated data of both the payload and the wrapped data key, so a ciphertext
copied into another row, or a wrapped key paired with another payload, fails
to open.
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.crypto.keyring import KEY_BYTES, NONCE_BYTES, DecryptionFailed, KeyRing
from gateway.store.sealed import Sealed, context  # noqa: F401 (context: callers build contexts through here)


def _dek_aad(ctx: bytes, kek_version: int) -> bytes:
    return b"dek|" + kek_version.to_bytes(4, "big") + ctx


class Envelope:
    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    def seal(self, plaintext: bytes, ctx: bytes) -> Sealed:
        dek = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = nonce + AESGCM(dek).encrypt(nonce, plaintext, ctx)
        version = self.keyring.current_version
        return Sealed(version, self.keyring.wrap(version, dek, _dek_aad(ctx, version)), ciphertext)

    def open(self, sealed: Sealed, ctx: bytes) -> bytes:
        dek = self.keyring.unwrap(sealed.kek_version, sealed.wrapped_dek, _dek_aad(ctx, sealed.kek_version))
        ct = sealed.ciphertext
        try:
            return AESGCM(dek).decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], ctx)
        except (InvalidTag, ValueError):
            raise DecryptionFailed("a ciphertext failed to authenticate in its context") from None

    def rewrap(self, sealed: Sealed, ctx: bytes, to_version: int) -> Sealed:
        """Re-wrap the data key under another KEK version; the payload is untouched."""
        if sealed.kek_version == to_version:
            return sealed
        dek = self.keyring.unwrap(sealed.kek_version, sealed.wrapped_dek, _dek_aad(ctx, sealed.kek_version))
        return Sealed(to_version, self.keyring.wrap(to_version, dek, _dek_aad(ctx, to_version)), sealed.ciphertext)
