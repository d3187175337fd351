"""The key-encryption key (KEK): versioned, loaded from a file or an env var.

Format (file and ``CREDGATE_KEK`` alike): one version per line (or comma
separated), ``N:<base64 of 32 random bytes>``; ``#`` starts a comment. The
highest version is the one new data keys are wrapped with; older versions stay
until nothing references them (see :mod:`gateway.crypto.rotation`).

A :class:`KeyRing` never hands its key bytes out: callers ask it to wrap and
unwrap data keys. A KEK held by a KMS (``CREDGATE_KEK_SOURCE=aws-kms`` or
``vault-transit``) is :class:`gateway.crypto.kmsring.KmsKeyRing`: the same local
wrapping, with versions the KMS unwraps once each.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import ConfigurationError, Conflict, CredgateError

KEY_BYTES = 32
NONCE_BYTES = 12
_LINE = re.compile(r"^(\d{1,9}):([A-Za-z0-9+/=_-]+)$")


class DecryptionFailed(CredgateError):
    """A ciphertext or wrapped key did not authenticate: wrong key, wrong row, or tampering."""

    code = "decryption_failed"


class KeyRing(Protocol):
    """What the envelope layer needs from a KEK holder."""

    description: str

    def versions(self) -> list[int]: ...

    @property
    def current_version(self) -> int: ...

    def fingerprint(self, version: int) -> str: ...

    def wrap(self, version: int, dek: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes: ...

    def can_add_version(self) -> bool: ...

    def add_version(self) -> int: ...

    def reload(self) -> None: ...

    async def load_new(self) -> None:
        """Pick up versions added elsewhere (another replica, an edited file)."""
        ...

    async def create_version(self) -> int:
        """Add a version and make it current (raises Conflict ``kek_read_only`` if the source can't)."""
        ...


def parse_keys(text: str, origin: str) -> dict[int, bytes]:
    keys: dict[int, bytes] = {}
    for raw in re.split(r"[\n,]", text):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            # Never quote the line: it is key material.
            raise ConfigurationError(f"{origin}: a KEK entry is not of the form N:<base64 32 bytes>")
        version = int(m.group(1))
        try:
            key = base64.urlsafe_b64decode(m.group(2).replace("+", "-").replace("/", "_"))
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{origin}: KEK version {version} is not valid base64") from None
        if len(key) != KEY_BYTES or version < 1:
            raise ConfigurationError(f"{origin}: KEK version {version} must be 32 bytes with a version >= 1")
        if version in keys:
            raise ConfigurationError(f"{origin}: KEK version {version} appears twice")
        keys[version] = key
    if not keys:
        raise ConfigurationError(f"{origin}: no KEK version found")
    return keys


def format_key(version: int, key: bytes) -> str:
    return f"{version}:{base64.b64encode(key).decode()}"


def new_key_file(path: Path) -> None:
    """Create a KEK file with one fresh version, mode 0600; never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = f"# credgate KEK: keep this file secret and backed up; losing it loses every secret.\n{format_key(1, secrets.token_bytes(KEY_BYTES))}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} already exists; refusing to overwrite a KEK file") from None
    with os.fdopen(fd, "w") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class LocalKeyRing:
    """A KEK held in process memory, read from a file or a string."""

    def __init__(self, *, path: Path | None = None, value: str | None = None) -> None:
        if (path is None) == (value is None):
            raise ValueError("exactly one of path and value")
        self._path = path
        self._value = value
        self.description = f"file {path}" if path else "env CREDGATE_KEK"
        self._keys: dict[int, bytes] = {}
        self.reload()

    def reload(self) -> None:
        if self._path is not None:
            self._keys = parse_keys(_read_private_file(self._path), str(self._path))
        else:
            assert self._value is not None
            self._keys = parse_keys(self._value, "CREDGATE_KEK")

    def versions(self) -> list[int]:
        return sorted(self._keys)

    @property
    def current_version(self) -> int:
        return max(self._keys)

    def _key(self, version: int) -> bytes:
        key = self._keys.get(version)
        if key is None:
            # A replica whose file is older than the store: try the file once more.
            if self._path is not None:
                self.reload()
                key = self._keys.get(version)
            if key is None:
                raise DecryptionFailed(
                    f"KEK version {version} is not loaded ({self.description}); the KEK source is out of date"
                )
        return key

    def fingerprint(self, version: int) -> str:
        return hmac.new(self._key(version), b"credgate kek fingerprint v1", hashlib.sha256).hexdigest()[:16]

    def wrap(self, version: int, dek: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(self._key(version)).encrypt(nonce, dek, aad)

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return AESGCM(self._key(version)).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed("a data key failed to authenticate under its KEK") from None

    def can_add_version(self) -> bool:
        return self._path is not None and os.access(self._path, os.W_OK)

    def add_version(self) -> int:
        """Append a fresh version to the KEK file atomically (temp file, fsync, rename)."""
        if not self.can_add_version():
            raise Conflict(
                f"The KEK ({self.description}) can't be written by the gateway: add a version "
                "N:<base64 32 bytes> with a higher N to it, restart or reload, then rotate again.",
                code="kek_read_only",
            )
        assert self._path is not None
        self.reload()
        version = self.current_version + 1
        text = _read_private_file(self._path)
        if not text.endswith("\n"):
            text += "\n"
        text += format_key(version, secrets.token_bytes(KEY_BYTES)) + "\n"
        _atomic_write_private(self._path, text)
        self.reload()
        return version

    async def load_new(self) -> None:
        self.reload()

    async def create_version(self) -> int:
        return self.add_version()


def _read_private_file(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigurationError(f"KEK file {path} does not exist") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"KEK file {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    return path.read_text()


def _atomic_write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kek.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


KEK_HELP = (
    "no KEK configured. Create one with `credgate keys generate --out /path/to/kek` and set "
    "CREDGATE_KEK_FILE=/path/to/kek (or put its content in CREDGATE_KEK), or run `credgate serve --dev`."
)


def load_keyring(*, kek_file: Path | None, kek: str | None, dev: bool, dev_file: Path) -> KeyRing:
    """The keyring the settings describe; in dev mode, create a KEK file on first start."""
    if kek_file is not None and kek is not None:
        raise ConfigurationError("set either CREDGATE_KEK_FILE or CREDGATE_KEK, not both")
    if kek is not None:
        return LocalKeyRing(value=kek)
    if kek_file is not None:
        return LocalKeyRing(path=kek_file)
    if dev:
        if not dev_file.exists():
            new_key_file(dev_file)
        return LocalKeyRing(path=dev_file)
    raise ConfigurationError(KEK_HELP)
