"""What the store keeps of an encrypted record, and every record's context (its AES-GCM
associated data), in one place.

A sealed record is bound to where it lives: its context names the table's kind of record
and its key, so a ciphertext copied into another row does not decrypt. Encryption itself
is :mod:`gateway.crypto.envelope`; this module holds no key and imports nothing above
the store. Every table with sealed columns is listed, with how to get each row's context,
in :mod:`gateway.store.sealed_tables` (KEK rotation walks that list).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def secret_context(backend: str, path: str, version: int) -> bytes:
    """A version of a secret of a ``local`` backend."""
    return context("secret", backend, path, version)


def lease_context(lease_id: str) -> bytes:
    """The response of an issuance made with an Idempotency-Key, kept for its replay."""
    return context("lease-response", lease_id)


def wrap_context(token_hash: str) -> bytes:
    """The payload behind a wrap token."""
    return context("wrap", token_hash)


def signing_context(kid: str) -> bytes:
    """The private half of a gateway signing key."""
    return context("signing-key", kid)


def backend_config_context(name: str) -> bytes:
    """A backend's configuration (it may hold credentials for the vendor's store)."""
    return context("backend-config", name)


AUDIT_KEY_CONTEXT = context("audit-hmac-key")  # the audit trail's sealed key
