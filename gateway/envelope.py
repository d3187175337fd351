"""Envelope encryption: a fresh AES-256-GCM data key per record, wrapped by the KEK.

A record is sealed under a *context*: the tuple of names that say where it
lives (e.g. ``("secret", backend, path, version)``). The context is the
associated data of both the payload and the wrapped data key, so a ciphertext
copied into another row, or a wrapped key paired with another payload, fails
to open.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.keyring import KEY_BYTES, NONCE_BYTES, DecryptionFailed, KeyRing


@dataclass(frozen=True)
class Sealed:
    """What a store row keeps for one encrypted record."""

    kek_version: int
    wrapped_dek: bytes  # nonce || AES-GCM(KEK, dek)
    ciphertext: bytes  # nonce || AES-GCM(dek, plaintext)

    def __repr__(self) -> str:  # never print ciphertexts into logs either
        return f"Sealed(kek_version={self.kek_version}, {len(self.ciphertext)} bytes)"


def context(*parts: str | int) -> bytes:
    """Encode a context unambiguously: each part length-prefixed."""
    out = bytearray(b"credgate/v1")
    for part in parts:
        raw = str(part).encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


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
