"""The KekSource protocol: a key-encryption key held in a KMS.

credgate's own store seals every record under a fresh data key, and wraps the data
key with a KEK version (:mod:`gateway.crypto.envelope`). With a KMS source, each KEK
version is 32 random bytes that the gateway keeps *wrapped by the KMS key* in the
store (``kek_versions.wrapped_key``); at start-up, and when a version appears, the
key ring asks the source to unwrap it once and keeps it in memory for the life of the
process (as it keeps a file KEK). The KMS key itself never leaves the KMS; a secret
read or write makes no KMS call.

Writing one
-----------

1. A class in ``kms/<name>.py`` with ``type`` (the ``CREDGATE_KEK_SOURCE`` value),
   ``config_model`` (a pydantic model of its options), built as
   ``cls(config, timeout=seconds)``. The constructor does no I/O.
2. Register it in ``gateway/plugins/registry.py`` (``KEK_SOURCES``) with the pip extra
   that brings its SDK, and map its settings in ``gateway/runtime.py``.
3. Implement :class:`KekSource`. Every SDK call goes through :func:`kms_call` (a
   worker thread, a deadline, counted in ``calls``); give the SDK its own
   connect/read timeouts too.

Errors a source raises (from :mod:`gateway.errors`, never a vendor exception)
-------------------------------------------------------------------------------

- :class:`TargetUnreachable` (``kms_unreachable``): the KMS did not answer (refused,
  DNS, TLS, timeout, throttled, sealed, 5xx). Worth retrying.
- :class:`TargetError` with ``code``: ``target_auth_failed`` (credentials missing or
  refused), ``target_permission_denied`` (the caller may not use the key),
  ``kms_key_not_found``, ``kms_key_disabled`` (disabled, pending deletion, or a key
  that can't encrypt), ``kms_decrypt_failed`` (the ciphertext does not open under
  this key and context, or its key version is no longer allowed).

Messages are the source's own sentences, naming the key and at most
``sanitize(exc)`` (class and vendor error code, never the vendor's text: it can
quote a request, a token or a URL with credentials). The key ring turns these into
a :class:`~gateway.errors.ConfigurationError` at start-up (``credgate serve`` exits
2 with one line) and into 503 ``kms_unavailable`` with ``Retry-After`` while serving.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from connectors.base import generic_sanitize, run_sync
from gateway.errors import CredgateError, TargetError, TargetUnreachable

__all__ = ["KekSource", "KmsSourceBase", "TargetError", "TargetUnreachable", "Wrapped", "context_bytes", "kms_call"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Wrapped:
    """A KEK version as the KMS wrapped it: ``blob`` is stored as is (opaque to the
    gateway; it may carry what the source needs to unwrap it, e.g. the key's ARN), and
    ``key_version`` names the version of the KMS key that wrapped it."""

    blob: bytes
    key_version: str

    def __repr__(self) -> str:
        return f"Wrapped(key_version={self.key_version!r}, {len(self.blob)} bytes)"


@runtime_checkable
class KekSource(Protocol):
    """A KMS key that wraps and unwraps the gateway's KEK versions."""

    type: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    description: str  # what and where, without a secret: "aws-kms key alias/credgate in eu-west-1"
    calls: Counter[str]  # requests made to the KMS, by operation (the tests and `keys status` read it)

    async def key_version(self) -> str:
        """The version of the KMS key that a wrap made now would use (an opaque string,
        compared for equality: a change means the KMS key was rotated or replaced).
        Also proves the key exists, is enabled and may be used."""
        ...

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> Wrapped:
        """Encrypt ``plaintext`` (a KEK version, 32 bytes) under the KMS key's current
        version, bound to ``context`` (unwrapping needs the same context)."""
        ...

    async def unwrap(self, blob: bytes, context: Mapping[str, str]) -> bytes:
        """The plaintext of a :class:`Wrapped` blob, under any version of the key the
        KMS still allows."""
        ...

    async def aclose(self) -> None:
        """Release the client. Idempotent."""
        ...

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """What may be shown of an SDK exception: its class and vendor code, never its text."""
        ...


def context_bytes(context: Mapping[str, str]) -> bytes:
    """A context as canonical bytes (sorted compact JSON), for KMSs whose associated
    data is bytes rather than a map."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


class KmsSourceBase:
    """Shared plumbing: the call counter, the deadline, the protocol's three calls (each a
    blocking ``_version_now``/``_wrap``/``_unwrap`` of the subclass, run by :func:`kms_call`),
    and the translation of what a synchronous SDK raises. Subclasses implement those three
    and :meth:`translate`."""

    type: ClassVar[str] = ""
    config_model: ClassVar[type[BaseModel]]
    description: str = ""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()

    def count(self, operation: str) -> None:
        """Note one request to the KMS (called in the worker thread, before each SDK call)."""
        with self._calls_lock:
            self.calls[operation] += 1

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        return generic_sanitize(exc)

    def translate(self, doing: str, exc: Exception) -> CredgateError:
        """The gateway error for an SDK exception raised while ``doing``."""
        return TargetError(f"{self.description}: the KMS call failed while {doing} ({self.sanitize(exc)}).",
                           code="kms_error")

    def _version_now(self) -> str:
        raise NotImplementedError

    def _wrap(self, plaintext: bytes, context: dict[str, str]) -> Wrapped:
        raise NotImplementedError

    def _unwrap(self, blob: bytes, context: dict[str, str]) -> bytes:
        raise NotImplementedError

    async def key_version(self) -> str:
        return await kms_call(self, "reading the key", self._version_now)

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> Wrapped:
        return await kms_call(self, "wrapping a KEK version", self._wrap, plaintext, dict(context))

    async def unwrap(self, blob: bytes, context: Mapping[str, str]) -> bytes:
        return await kms_call(self, "unwrapping a KEK version", self._unwrap, blob, dict(context))

    async def aclose(self) -> None:
        return None


async def kms_call(source: KmsSourceBase, doing: str, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` (blocking SDK calls) in a worker thread under ``source.timeout``
    seconds; translate what it raises with ``source.translate`` (``raise ... from None``:
    the vendor's text never travels)."""
    try:
        return await run_sync(fn, *args, timeout=source.timeout)
    except TimeoutError:
        raise TargetUnreachable(
            f"{source.description} did not answer within {source.timeout:g} s ({doing}).", code="kms_unreachable"
        ) from None
    except CredgateError:
        raise
    except Exception as exc:  # a vendor exception: translated, never chained
        err = source.translate(doing, exc)
    raise err from None
