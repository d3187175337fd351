"""Envelope encryption: round trips, context (AAD) binding, tampering, re-wrap."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.crypto.envelope import Envelope, Sealed, context
from gateway.crypto.keyring import DecryptionFailed, LocalKeyRing, format_key


def ring(*versions: int) -> LocalKeyRing:
    return LocalKeyRing(value=",".join(format_key(v, bytes([v]) * 32) for v in versions))


ENV = Envelope(ring(1, 2))
parts = st.lists(st.one_of(st.text(max_size=20), st.integers()), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(max_size=4096), ctx_parts=parts)
def test_round_trip(plaintext: bytes, ctx_parts: list) -> None:
    ctx = context(*ctx_parts)
    sealed = ENV.seal(plaintext, ctx)
    assert sealed.kek_version == 2
    assert ENV.open(sealed, ctx) == plaintext


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(min_size=1, max_size=256), a=parts, b=parts)
def test_other_context_fails(plaintext: bytes, a: list, b: list) -> None:
    ca, cb = context(*a), context(*b)
    if ca == cb:
        return
    sealed = ENV.seal(plaintext, ca)
    with pytest.raises(DecryptionFailed):
        ENV.open(sealed, cb)


def test_context_encoding_is_unambiguous() -> None:
    # ("ab", "c") and ("a", "bc") must not collide; neither may a str and an int of the same text
    # collide with a shifted boundary.
    assert context("ab", "c") != context("a", "bc")
    assert context("secret", "local", "a/b", 1) != context("secret", "local/a", "b", 1)


def test_ciphertext_moved_to_another_row_fails() -> None:
    a = ENV.seal(b'{"password":"one"}', context("secret", "local", "app/a", 1))
    b = ENV.seal(b'{"password":"two"}', context("secret", "local", "app/b", 1))
    swapped = Sealed(b.kek_version, b.wrapped_dek, a.ciphertext)
    with pytest.raises(DecryptionFailed):
        ENV.open(swapped, context("secret", "local", "app/b", 1))
    with pytest.raises(DecryptionFailed):
        ENV.open(a, context("secret", "local", "app/a", 2))  # another version


@settings(max_examples=100, deadline=None)
@given(flip=st.integers(min_value=0, max_value=10_000), which=st.sampled_from(["dek", "ct"]))
def test_any_flipped_bit_is_detected(flip: int, which: str) -> None:
    ctx = context("secret", "local", "x", 1)
    s = ENV.seal(b"payload", ctx)
    target = bytearray(s.wrapped_dek if which == "dek" else s.ciphertext)
    target[flip % len(target)] ^= 1 << (flip % 8)
    bad = Sealed(s.kek_version, bytes(target), s.ciphertext) if which == "dek" else Sealed(s.kek_version, s.wrapped_dek, bytes(target))
    with pytest.raises(DecryptionFailed):
        ENV.open(bad, ctx)


def test_wrong_kek_version_label_fails() -> None:
    ctx = context("x")
    s = ENV.seal(b"data", ctx)
    with pytest.raises(DecryptionFailed):
        ENV.open(Sealed(1, s.wrapped_dek, s.ciphertext), ctx)


def test_fresh_data_key_per_record() -> None:
    ctx = context("x")
    a, b = ENV.seal(b"same", ctx), ENV.seal(b"same", ctx)
    assert a.wrapped_dek != b.wrapped_dek and a.ciphertext != b.ciphertext


def test_rewrap_changes_only_the_wrapped_key() -> None:
    old = Envelope(ring(1))
    ctx = context("secret", "local", "p", 3)
    s1 = old.seal(b"value", ctx)
    new = Envelope(ring(1, 2))
    s2 = new.rewrap(s1, ctx, 2)
    assert s2.kek_version == 2 and s2.ciphertext == s1.ciphertext and s2.wrapped_dek != s1.wrapped_dek
    assert new.open(s2, ctx) == b"value"
    # Once rewrapped, version 1 is no longer needed.
    only2 = Envelope(LocalKeyRing(value=format_key(2, bytes([2]) * 32)))
    assert only2.open(s2, ctx) == b"value"


def test_sealed_repr_shows_no_bytes() -> None:
    s = ENV.seal(b"CANARY-PLAINTEXT", context("x"))
    assert "CANARY" not in repr(s) and s.ciphertext.hex() not in repr(s)


def test_unknown_version_names_the_source(tmp_path: Path) -> None:
    with pytest.raises(DecryptionFailed, match="KEK version 7 is not loaded"):
        ENV.open(Sealed(7, b"\0" * 60, b"\0" * 40), context("x"))
