"""Policies: deny by default, claim templates, YAML, explain names the deciding rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.rules import PolicyDocument, PolicySet, Subject, covers, glob_regex
from tests.conftest import Gateway

ML = Subject("k8s", "system:serviceaccount:ml:trainer", frozenset(), {"project": "ml", "groups": ["data"]})

DOC = PolicyDocument.model_validate({
    "rules": [
        {"description": "pipelines read their project's buckets",
         "principals": {"issuer": "k8s", "subject": "system:serviceaccount:*", "claims": {"groups": "data"}},
         "actions": ["credentials:issue"], "connectors": ["aws"],
         "resources": ["s3-bucket:{claims.project}-*"], "max_ttl_seconds": 900},
        {"principals": {"issuer": "k8s", "subject": "system:serviceaccount:ml:*"},
         "actions": ["credentials:issue"], "connectors": ["aws"], "resources": ["s3-bucket:{claims.project}-raw"],
         "max_ttl_seconds": 3600},
    ]
})


def test_deny_by_default_and_explained() -> None:
    d = PolicySet().decide(ML, "credentials:issue", "aws", "s3-bucket:ml-a")
    assert not d.allowed and d.rule is None and "no rule allows" in d.reason


def test_template_claims_and_deciding_rule() -> None:
    ps = PolicySet([("pipelines", DOC)])
    d = ps.decide(ML, "credentials:issue", "aws", "s3-bucket:ml-features")
    assert d.allowed and d.rule == "pipelines/0" and d.max_ttl.total_seconds() == 900
    both = ps.decide(ML, "credentials:issue", "aws", "s3-bucket:ml-raw")
    assert both.allowed and both.rule == "pipelines/1"  # the longest TTL decides
    assert not ps.decide(ML, "credentials:issue", "aws", "s3-bucket:finance-raw").allowed
    assert not ps.decide(ML, "credentials:issue", "postgres", "s3-bucket:ml-x").allowed
    assert not ps.decide(ML, "credentials:wrap", "aws", "s3-bucket:ml-x").allowed


def test_a_claim_can_not_widen_a_pattern() -> None:
    ps = PolicySet([("pipelines", DOC)])
    sneaky = Subject("k8s", "system:serviceaccount:x:y", frozenset(), {"project": "*", "groups": "data"})
    assert not ps.decide(sneaky, "credentials:issue", "aws", "s3-bucket:finance-raw").allowed
    missing = Subject("k8s", "system:serviceaccount:x:y", frozenset(), {"groups": "data"})
    assert not ps.decide(missing, "credentials:issue", "aws", "s3-bucket:-x").allowed


def test_builtin_roles() -> None:
    ps = PolicySet()
    admin = Subject("credgate", "admin_key:a", frozenset({"admin"}))
    auditor = Subject("credgate", "admin_key:b", frozenset({"auditor"}))
    assert ps.decide(admin, "policies:manage").rule == "builtin/admin"
    assert ps.decide(auditor, "leases:read").allowed and not ps.decide(auditor, "secrets:reveal").allowed


pattern = st.text(alphabet="ab*", min_size=1, max_size=6)


@given(broad=pattern, narrow=pattern, concrete=st.text(alphabet="abc", max_size=8))
def test_covers_is_sound(broad: str, narrow: str, concrete: str) -> None:
    """If `broad` covers `narrow`, every string `narrow` matches, `broad` matches too."""
    if covers(broad, narrow) and glob_regex(narrow).match(concrete):
        assert glob_regex(broad).match(concrete)


pytestmark_api = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@pytestmark_api
async def test_policy_api_yaml_and_explain(gateway: Gateway) -> None:
    yaml_doc = """
description: ML pipelines
rules:
  - description: pipelines read their project's buckets
    principals: {issuer: k8s, subject: "system:serviceaccount:*", claims: {groups: data}}
    actions: [credentials:issue]
    connectors: [aws]
    resources: ["s3-bucket:{claims.project}-*"]
    max_ttl_seconds: 900
"""
    r = await gateway.client.put("/v1/policies/pipelines", content=yaml_doc, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    ask = {"principal": {"issuer": "k8s", "subject": "system:serviceaccount:ml:trainer", "claims": {"project": "ml", "groups": ["data"]}},
           "action": "credentials:issue", "connector": "aws", "resource": "s3-bucket:ml-features"}
    out = (await gateway.client.post("/v1/policies/explain", json=ask)).json()
    assert out == {"decision": "allow", "rule": "pipelines/0", "reason": "pipelines read their project's buckets", "max_ttl_seconds": 900}
    out = (await gateway.client.post("/v1/policies/explain", json={**ask, "resource": "s3-bucket:hr-x"})).json()
    assert out["decision"] == "deny" and out["rule"] is None and "no rule allows" in out["reason"]
    bad = await gateway.client.put("/v1/policies/x", content="rules: [{actions: [fly]}]", headers={"Content-Type": "application/yaml"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_failed"
    bad = await gateway.client.put("/v1/policies/x", content="{: nope", headers={"Content-Type": "application/yaml"})
    assert bad.status_code == 400
    assert [p["name"] for p in (await gateway.client.get("/v1/policies")).json()["items"]] == ["pipelines"]
    assert (await gateway.client.delete("/v1/policies/pipelines")).status_code == 204
    out = (await gateway.client.post("/v1/policies/explain", json=ask)).json()
    assert out["decision"] == "deny"


@pytestmark_api
async def test_policies_are_compiled_once_per_change(gateway: Gateway) -> None:
    policies = gateway.runtime.policies
    first = await policies.current()
    assert await policies.current() is first  # no change, same compiled object
    await gateway.client.put("/v1/policies/p", json={"rules": [{"principals": {"roles": ["auditor"]}, "actions": ["secrets:read"]}]})
    assert await policies.current() is not first
