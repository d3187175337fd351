"""The KEK: file format, permissions, dev creation, versions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.errors import ConfigurationError, Conflict
from gateway.crypto.keyring import LocalKeyRing, format_key, load_keyring, new_key_file, parse_keys

KEY = b"k" * 32


def test_new_key_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "kek"
    new_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert LocalKeyRing(path=path).versions() == [1]
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        new_key_file(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_readable_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek"
    new_key_file(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        LocalKeyRing(path=path)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "no KEK version"),
        ("1:abcd", "must be 32 bytes"),
        ("1:abc", "not valid base64"),
        ("one:" + format_key(1, KEY).split(":")[1], "not of the form"),
        (format_key(1, KEY) + "\n" + format_key(1, KEY), "appears twice"),
        ("0:" + format_key(1, KEY).split(":")[1], "version >= 1"),
        ("1:!!!!", "not of the form"),
    ],
)
def test_malformed_keys_are_refused_without_quoting_them(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_keys(text, "CREDGATE_KEK")
    assert problem in str(info.value)
    secret_part = text.split(":", 1)[-1] if ":" in text else ""
    if len(secret_part) > 8:
        assert secret_part not in str(info.value)


def test_comments_commas_and_newlines() -> None:
    text = f"# a comment\n{format_key(1, KEY)}  # trailing\n,{format_key(3, b'z' * 32)}"
    assert sorted(parse_keys(text, "x")) == [1, 3]


def test_add_version_appends_atomically_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    new_key_file(path)
    ring = LocalKeyRing(path=path)
    fp1 = ring.fingerprint(1)
    assert ring.add_version() == 2
    assert ring.current_version == 2 and ring.versions() == [1, 2]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert LocalKeyRing(path=path).fingerprint(1) == fp1
    assert [p.name for p in tmp_path.iterdir()] == ["kek"]  # no temp file left behind


def test_env_keyring_can_not_add_versions() -> None:
    ring = LocalKeyRing(value=format_key(1, KEY))
    assert not ring.can_add_version()
    with pytest.raises(Conflict) as info:
        ring.add_version()
    assert info.value.code == "kek_read_only"


def test_no_kek_outside_dev_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="credgate keys generate"):
        load_keyring(kek_file=None, kek=None, dev=False, dev_file=tmp_path / "kek")
    assert not (tmp_path / "kek").exists()


def test_dev_creates_the_kek_once(tmp_path: Path) -> None:
    ring = load_keyring(kek_file=None, kek=None, dev=True, dev_file=tmp_path / "kek")
    again = load_keyring(kek_file=None, kek=None, dev=True, dev_file=tmp_path / "kek")
    assert ring.fingerprint(1) == again.fingerprint(1)


def test_both_sources_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        load_keyring(kek_file=tmp_path / "k", kek=format_key(1, KEY), dev=False, dev_file=tmp_path / "kek")
