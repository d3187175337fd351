"""TTLs are decided in one place: the smallest of request, connector max, type max, policy max, run max."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.errors import ValidationFailed
from gateway.issuing.leases import calculate_ttl

S = timedelta(seconds=1)
LIMITS = dict(default=600 * S, maximum=3600 * S, type_min=60 * S, type_max=7200 * S)


def test_default_when_not_requested() -> None:
    d = calculate_ttl(None, **LIMITS)
    assert d.ttl == 600 * S and not d.capped and d.requested is None


def test_request_under_the_cap_is_honoured() -> None:
    d = calculate_ttl(900, **LIMITS)
    assert d.ttl == 900 * S and not d.capped


def test_request_over_connector_max_is_capped_and_says_so() -> None:
    d = calculate_ttl(10_000, **LIMITS)
    assert d.ttl == 3600 * S and d.capped and d.requested == 10_000 * S


def test_type_max_and_policy_max_cap_too() -> None:
    assert calculate_ttl(9000, **{**LIMITS, "maximum": 99_999 * S}).ttl == 7200 * S
    d = calculate_ttl(5000, **LIMITS, policy_max=120 * S)
    assert d.ttl == 120 * S and d.capped


def test_under_the_type_minimum_is_refused() -> None:
    with pytest.raises(ValidationFailed) as e:
        calculate_ttl(10, **LIMITS)
    assert e.value.code == "ttl_too_short"


def test_a_run_tokens_max_caps_too_and_the_cap_is_reported() -> None:
    d = calculate_ttl(5000, **LIMITS, policy_max=900 * S, run_max=300 * S)
    assert d.ttl == 300 * S and d.capped and d.cap == 300 * S
    # The cap is the smallest max, whatever was asked: it bounds the lease's whole life.
    d = calculate_ttl(None, **LIMITS, policy_max=1800 * S)
    assert d.ttl == 600 * S and not d.capped and d.cap == 1800 * S
