"""The audit chain verifier, property-based: any edit, deletion, reordering or
insertion is found, at the right position; an untouched chain verifies."""

from __future__ import annotations

import copy
import json

from hypothesis import given
from hypothesis import strategies as st

from gateway.audit.trail import FIELDS, GENESIS, chain_hash, keyed_hash, verify_chain


def make_chain(n: int) -> list[dict]:
    events, prev = [], GENESIS
    for seq in range(1, n + 1):
        e = {f: None for f in FIELDS}
        e.update(seq=seq, time=f"2026-11-26T00:00:{seq % 60:02d}+00:00", subject=f"s{seq % 3}",
                 action="credentials:issue", decision="allow", outcome="ok", details={"i": seq})
        e["prev_hash"] = prev
        e["hash"] = prev = chain_hash(prev, e)
        events.append(e)
    return events


@given(n=st.integers(0, 30))
def test_untouched_chain_verifies(n: int) -> None:
    report = verify_chain(make_chain(n))
    assert report.ok and report.events == n


@given(n=st.integers(1, 30), data=st.data())
def test_modified_event_is_named(n: int, data: st.DataObject) -> None:
    chain = make_chain(n)
    i = data.draw(st.integers(0, n - 1))
    field = data.draw(st.sampled_from(["subject", "action", "decision", "outcome", "details", "time"]))
    chain[i][field] = "tampered" if field != "details" else {"i": -1}
    report = verify_chain(chain)
    assert not report.ok and report.first_bad_seq == i + 1 and "modified" in report.problem


@given(n=st.integers(2, 30), data=st.data())
def test_deleted_event_is_named(n: int, data: st.DataObject) -> None:
    chain = make_chain(n)
    i = data.draw(st.integers(0, n - 2))  # not the last: deleting the tail is caught by checkpoints
    del chain[i]
    report = verify_chain(chain)
    assert not report.ok and report.first_bad_seq == i + 1


@given(n=st.integers(2, 30), data=st.data())
def test_reordered_events_are_named(n: int, data: st.DataObject) -> None:
    chain = make_chain(n)
    i = data.draw(st.integers(0, n - 2))
    chain[i], chain[i + 1] = chain[i + 1], chain[i]
    report = verify_chain(chain)
    assert not report.ok and report.first_bad_seq in (i + 1, i + 2)


@given(n=st.integers(1, 30), data=st.data())
def test_inserted_event_is_named(n: int, data: st.DataObject) -> None:
    chain = make_chain(n)
    i = data.draw(st.integers(0, n - 1))
    forged = copy.deepcopy(chain[i])
    forged["subject"] = "intruder"
    forged["hash"] = chain_hash(forged["prev_hash"], forged)  # even a well-formed forgery
    chain.insert(i + 1, forged)
    report = verify_chain(chain)
    assert not report.ok and report.first_bad_seq in (i + 1, i + 2)


def test_keyed_hash_is_stable_and_keyed() -> None:
    a = keyed_hash(b"k1" * 16, "cgw_token")
    assert a == keyed_hash(b"k1" * 16, "cgw_token") and a != keyed_hash(b"k2" * 16, "cgw_token")
    assert "cgw_token" not in a and a.startswith("hmac-sha256:")


KEY = b"k" * 32


def make_keyed_chain(n: int, chain_from: int) -> list[dict]:
    """Events before ``chain_from`` with plain links (an upgraded deployment), keyed after."""
    events, prev = [], GENESIS
    for seq in range(1, n + 1):
        e = {f: None for f in FIELDS}
        e.update(seq=seq, time=f"2026-11-26T00:00:{seq % 60:02d}+00:00", subject=f"s{seq}", details={"i": seq})
        e["prev_hash"] = prev
        e["hash"] = prev = chain_hash(prev, e, KEY if seq >= chain_from else None)
        events.append(e)
    return events


@given(n=st.integers(1, 30), data=st.data())
def test_a_keyed_chain_verifies_only_under_its_key(n: int, data: st.DataObject) -> None:
    chain_from = data.draw(st.integers(1, n + 1))
    chain = make_keyed_chain(n, chain_from)
    assert verify_chain(chain, key=KEY, chain_from=chain_from).ok
    if chain_from <= n:
        assert not verify_chain(chain, key=b"x" * 32, chain_from=chain_from).ok


@given(n=st.integers(1, 30), data=st.data())
def test_a_keyed_chain_recomputed_without_the_key_is_refused(n: int, data: st.DataObject) -> None:
    """Write access to the store is not enough: an edit with every link recomputed as plain
    SHA-256 (what the old chain allowed) is found at the first keyed event."""
    chain = make_keyed_chain(n, 1)
    i = data.draw(st.integers(0, n - 1))
    chain[i]["subject"] = "intruder"
    prev = GENESIS
    for e in chain:
        e["prev_hash"], e["hash"] = prev, chain_hash(prev, e)
        prev = e["hash"]
    report = verify_chain(chain, key=KEY, chain_from=1)
    assert not report.ok and report.first_bad_seq == 1 and "modified" in report.problem


def test_every_field_is_bounded_where_the_event_is_built() -> None:
    from gateway.audit.trail import CUT, DETAILS_MAX, bound_event
    from gateway.store.models import AuditEventRow

    event = {f: "x\x00" * 5000 for f in FIELDS if f not in ("seq", "time", "details")}
    event["details"] = {"big": "v" * 100_000, "list": list(range(1000)), "k" * 200: 1, "s": "\ud800"}
    bound_event(event)
    for column in AuditEventRow.__table__.columns:
        if column.name in event and isinstance(event[column.name], str):
            assert len(event[column.name]) <= column.type.length and "\x00" not in event[column.name]
            assert event[column.name].endswith(CUT)
    assert len(json.dumps(event["details"])) <= DETAILS_MAX and event["details"]["s"] == "?"
    assert bound_event({"details": "plain"})["details"] == {"value": "plain"}
