"""The audit trail: one event per decision, chained by hashes, checkpointed with signatures.

Each event holds who (issuer and subject), what (action and target), the
decision and the rule that made it, the outcome, the lease, the request id
and the client address. Never a secret value, password or token: sensitive
identifiers (a wrap token, a client secret) are recorded as HMAC-SHA256 under
a per-deployment key, so an investigator holding a value can find it
(``POST /v1/audit/hash``) while the log itself reveals nothing.

Tamper evidence: event *n* stores ``hash_n = SHA-256(prev_hash || canonical
JSON of event n)``. Changing an event breaks its own hash; deleting,
reordering or inserting one breaks the sequence or the link to its
predecessor. :func:`verify_chain` walks the events and names the first bad
position. Checkpoints (the head's sequence and hash) are signed with the
gateway's signing key, so rewriting the whole tail after a checkpoint is
detected too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS = "0" * 64
FIELDS = (
    "seq", "time", "request_id", "issuer", "subject", "action", "target", "decision", "rule", "outcome",
    "lease_id", "client_addr", "details",
)


def canonical(event: Mapping[str, Any]) -> bytes:
    body = {k: (event[k].isoformat() if isinstance(event.get(k), datetime) else event.get(k)) for k in FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(event)).hexdigest()


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 of a sensitive identifier, for the log and for searching it."""
    return "hmac-sha256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None


def verify_chain(events: Iterable[Mapping[str, Any]], *, start_seq: int = 1, start_hash: str = GENESIS) -> ChainReport:
    """Walk events in storage order; report the first one that breaks the chain.

    ``events`` are mappings with every field of :data:`FIELDS` plus ``prev_hash``
    and ``hash``.
    """
    expected_seq, prev, n = start_seq, start_hash, 0
    for event in events:
        n += 1
        seq = event["seq"]
        if seq != expected_seq:
            what = "missing (deleted)" if seq > expected_seq else "out of order or duplicated"
            return ChainReport(False, n, expected_seq if seq > expected_seq else seq, f"event {expected_seq} is {what}")
        if event["prev_hash"] != prev:
            return ChainReport(False, n, seq, f"event {seq} does not link to the event before it")
        if not hmac.compare_digest(event["hash"], chain_hash(prev, event)):
            return ChainReport(False, n, seq, f"event {seq} was modified")
        prev, expected_seq = event["hash"], seq + 1
    return ChainReport(True, n)
