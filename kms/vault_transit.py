"""``vault-transit``: credgate's KEK versions wrapped by a key of a Vault or OpenBao
transit engine (hvac).

Config (settings ``CREDGATE_KEK_VAULT_*``):

- ``url`` (``https://vault.example:8200``), ``mount`` (default ``transit``), ``key``
  (the transit key's name; an ``aes256-gcm96`` or ``chacha20-poly1305`` key: the
  wrap is bound to its context as associated data);
- ``token`` or ``token_file`` (one of them). A token file is re-read when it changes
  (a Vault Agent sink or a projected file), so a renewed token is picked up without
  a restart; renewing the token is the agent's job;
- ``namespace`` (Vault Enterprise / OpenBao namespaces), ``ca_cert`` (a PEM bundle to
  verify the server with; default: the system's).

The token's policy needs::

    path "<mount>/keys/<key>"    { capabilities = ["read"] }
    path "<mount>/encrypt/<key>" { capabilities = ["update"] }
    path "<mount>/decrypt/<key>" { capabilities = ["update"] }

and nothing else (KEK versions are re-wrapped from memory with ``encrypt``; the
gateway never rotates the customer's key, and needs no ``rewrap``).

Key version: the transit key's ``latest_version`` (what ``encrypt`` uses); the
stored blob is the transit ciphertext itself (``vault:vN:...``). After
``bao write -f <mount>/keys/<key>/rotate`` old ciphertexts still decrypt; the gateway
follows: a new KEK version wrapped under ``vN+1``, records re-wrapped to it in the
background, older KEK versions re-wrapped under ``vN+1``, after which
``min_decryption_version`` may be raised.

Errors: connection failures, timeouts, 429, 5xx and a sealed server ->
``TargetUnreachable`` (``kms_unreachable``); 403 with a token that does not look
itself up -> ``target_auth_failed``, 403 otherwise -> ``target_permission_denied``;
the key missing (404) -> ``kms_key_not_found``; a key that can't encrypt ->
``kms_key_disabled``; a ciphertext refused (400: wrong key, context, or a version
below ``min_decryption_version``) -> ``kms_decrypt_failed``. hvac's messages quote
URLs and server text: only the exception class and HTTP status are shown.
"""

from __future__ import annotations

import base64
import re
import threading
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from gateway.errors import CredgateError, TargetError, TargetUnreachable
from kms.base import KmsSourceBase, Wrapped, context_bytes

_CIPHERTEXT = re.compile(r"^vault:v(\d+):[A-Za-z0-9+/=]+$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class VaultTransitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://", description="The Vault/OpenBao address.")
    mount: str = Field("transit", pattern=_NAME, description="Where the transit engine is mounted.")
    key: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="The transit key's name.")
    token: SecretStr | None = None
    token_file: Path | None = None
    namespace: str | None = Field(None, pattern=_NAME)
    ca_cert: Path | None = None

    @model_validator(mode="after")
    def _one_token(self) -> VaultTransitConfig:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token and token_file")
        return self


class VaultTransitSource(KmsSourceBase):
    type: ClassVar[str] = "vault-transit"
    config_model: ClassVar[type[BaseModel]] = VaultTransitConfig

    def __init__(self, config: VaultTransitConfig, *, timeout: float = 5.0) -> None:
        super().__init__(timeout)
        self.config = config
        ns = f" (namespace {config.namespace})" if config.namespace else ""
        self.description = f"vault-transit key {config.mount}/{config.key} at {config.url}{ns}"
        self._client: Any = None
        self._token_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    # --- the SDK, in worker threads only ----------------------------------------------

    def _token(self) -> str | None:
        """The token: the configured one, or the file's content, re-read when the file
        changed (returns None when it did not change since the client was built)."""
        if self.config.token is not None:
            return self.config.token.get_secret_value() if self._client is None else None
        assert self.config.token_file is not None
        path = self.config.token_file
        try:
            st = path.stat()
        except OSError as exc:
            raise _Refused("target_auth_failed", f"the token file {path} can't be read ({type(exc).__name__})") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if self._client is not None and stamp == self._token_stamp:
            return None
        token = path.read_text().strip()
        if not token:
            raise _Refused("target_auth_failed", f"the token file {path} is empty")
        self._token_stamp = stamp
        return token

    def _vault(self) -> Any:
        with self._lock:
            token = self._token()
            if self._client is None:
                import hvac

                verify: bool | str = str(self.config.ca_cert) if self.config.ca_cert else True
                self._client = hvac.Client(
                    url=self.config.url, token=token, namespace=self.config.namespace,
                    verify=verify, timeout=self.timeout,
                )
            elif token is not None:
                self._client.token = token
            return self._client

    def _transit(self) -> Any:
        return self._vault().secrets.transit

    def _version_now(self) -> str:
        self.count("read_key")
        try:
            data = self._transit().read_key(name=self.config.key, mount_point=self.config.mount)["data"]
        except Exception as exc:
            if type(exc).__name__ == "Forbidden" and not self._token_valid():
                raise _Refused("target_auth_failed", "the token was refused (expired, revoked or wrong)") from None
            raise
        if not data.get("supports_encryption", False) or not data.get("supports_decryption", False):
            raise _Refused("kms_key_disabled", f"the transit key is of type {data.get('type')!r}, which can't encrypt")
        return str(data["latest_version"])

    def _token_valid(self) -> bool:
        self.count("lookup_self")
        try:
            self._vault().auth.token.lookup_self()
            return True
        except Exception:  # noqa: BLE001 - any failure: the token does not work
            return False

    def _wrap(self, plaintext: bytes, context: dict[str, str]) -> Wrapped:
        self.count("encrypt")
        out = self._transit().encrypt_data(
            name=self.config.key, mount_point=self.config.mount,
            plaintext=base64.b64encode(plaintext).decode(),
            associated_data=base64.b64encode(context_bytes(context)).decode(),
        )["data"]
        ciphertext = out["ciphertext"]
        m = _CIPHERTEXT.match(ciphertext)
        if not m:
            raise _Refused("kms_error", "the transit engine answered with an unexpected ciphertext")
        return Wrapped(ciphertext.encode(), m.group(1))

    def _unwrap(self, blob: bytes, context: dict[str, str]) -> bytes:
        text = blob.decode("ascii", "replace")
        if not _CIPHERTEXT.match(text):
            raise _Refused("kms_decrypt_failed", "a stored KEK version is not a transit ciphertext")
        self.count("decrypt")
        out = self._transit().decrypt_data(
            name=self.config.key, mount_point=self.config.mount, ciphertext=text,
            associated_data=base64.b64encode(context_bytes(context)).decode(),
        )["data"]
        return base64.b64decode(out["plaintext"])

    # --- the protocol ------------------------------------------------------------------

    async def aclose(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            adapter = getattr(client, "adapter", None)
            close = getattr(adapter, "close", None)
            if callable(close):
                close()

    # --- errors --------------------------------------------------------------------------

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        status = getattr(exc, "status_code", None)
        if isinstance(status, int):
            return f"{type(exc).__name__} {status}"
        if isinstance(exc, OSError) and isinstance(exc.errno, int):
            return f"{type(exc).__name__} ({exc.errno})"
        return type(exc).__name__

    def translate(self, doing: str, exc: Exception) -> CredgateError:
        if isinstance(exc, _Refused):
            return TargetError(f"{self.description}: {exc.why} ({doing}).", code=exc.code)
        import requests
        from hvac import exceptions as hx

        safe = self.sanitize(exc)
        if isinstance(exc, requests.exceptions.SSLError):
            return TargetUnreachable(f"{self.description}: TLS failed ({doing}; {safe}).", code="kms_unreachable")
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return TargetUnreachable(f"{self.description} did not answer ({doing}; {safe}).", code="kms_unreachable")
        if isinstance(exc, (hx.VaultDown, hx.InternalServerError, hx.RateLimitExceeded, hx.BadGateway)):
            return TargetUnreachable(f"{self.description} did not answer ({doing}; {safe}).", code="kms_unreachable")
        if isinstance(exc, hx.Unauthorized):
            return TargetError(f"{self.description}: the token was refused ({doing}; {safe}).",
                               code="target_auth_failed")
        if isinstance(exc, hx.Forbidden):
            return TargetError(f"{self.description}: the token may not use the key (or, to a token limited to "
                               f"other keys, it does not exist) ({doing}; {safe}).",
                               code="target_permission_denied")
        if isinstance(exc, hx.InvalidPath):
            return TargetError(f"{self.description}: the transit key (or mount) does not exist ({doing}; {safe}).",
                               code="kms_key_not_found")
        if isinstance(exc, hx.InvalidRequest) and doing.startswith("unwrapping"):
            return TargetError(
                f"{self.description}: a wrapped KEK version was refused (wrong key or context, or its key version "
                f"is below min_decryption_version) ({doing}; {safe}).", code="kms_decrypt_failed")
        return TargetError(f"{self.description}: the KMS call failed ({doing}; {safe}).", code="kms_error")


class _Refused(Exception):
    """A refusal decided here (key type, token file, blob shape): a code and a sentence of our own."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.why = why

