"""Policies: deny by default, explainable, compiled once per change.

A policy is a list of rules. A rule allows some *actions* to the principals
it matches (by issuer, subject glob, roles and claim values) on some
*connectors* and *resources* (globs; ``*`` is the only wildcard), up to a max
TTL. Resource patterns may use the principal's claims:
``s3-bucket:ml-{claims.project}-*``; a claim value is inserted literally (a
``*`` in a claim can't widen the pattern), and a rule whose template names a
missing claim does not match.

Three built-in roles are rules too (``builtin/admin``, ``builtin/operator``,
``builtin/auditor``), so ``explain`` names them like any other rule.

When several rules allow a request, the one granting the longest TTL decides
(policies add up, as in Vault); ``explain`` names it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ACTIONS = (
    "credentials:issue",
    "credentials:wrap",
    "secrets:read",
    "secrets:write",
    "secrets:reveal",
    "secrets:bind",
    "connectors:read",
    "connectors:manage",
    "backends:read",
    "backends:manage",
    "leases:read",
    "leases:revoke",
    "runs:delegate",
    "policies:read",
    "policies:manage",
    "issuers:manage",
    "clients:manage",
    "keys:read",
    "keys:manage",
    "admin_keys:manage",
    "audit:read",
)
Action = Literal[ACTIONS]  # type: ignore[valid-type]
Glob = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^?\[\]]+$")]


class PrincipalMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    issuer: Glob | None = Field(None, description="Issuer name ('credgate' for keys, clients and runs).")
    subject: Glob | None = None
    roles: list[str] | None = Field(None, description="Any of these roles.")
    claims: dict[str, str | list[str]] = Field(default_factory=dict, description="Claim -> value glob (or any of a list).")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(None, max_length=500)
    principals: PrincipalMatch
    actions: list[Action | Literal["*"]] = Field(..., min_length=1)  # type: ignore[valid-type]
    connectors: list[Glob] = Field(default_factory=lambda: ["*"])
    resources: list[Glob] = Field(default_factory=lambda: ["*"])
    max_ttl_seconds: int | None = Field(None, ge=1)


class PolicyDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(None, max_length=1000)
    rules: list[Rule] = Field(..., min_length=1, max_length=200)


READ = ["secrets:read", "backends:read", "connectors:read", "leases:read", "keys:read", "policies:read", "audit:read"]
BUILTIN: dict[str, Rule] = {
    "admin": Rule(principals=PrincipalMatch(roles=["admin"]), actions=["*"], description="built-in role admin"),
    "operator": Rule(
        principals=PrincipalMatch(roles=["operator"]),
        actions=["secrets:read", "secrets:write", "backends:read", "connectors:read", "credentials:issue",
                 "credentials:wrap", "leases:read"],
        description="built-in role operator: use secrets and connectors, never reveal, bind or manage",
    ),
    "auditor": Rule(principals=PrincipalMatch(roles=["auditor"]), actions=READ, description="built-in role auditor"),
}


@dataclass(frozen=True)
class Subject:
    """What a rule can see of a principal."""

    issuer: str
    subject: str
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None  # "policy/index" or "builtin/role" of the deciding rule
    reason: str
    max_ttl: timedelta | None = None


MEMO_ENTRIES = 50_000


@functools.lru_cache(maxsize=4096)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches anything (also '/'); every other character only itself."""
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + r"\Z", re.S)


def covers(pattern: str, narrower: str) -> bool:
    """True when every string ``narrower`` matches is also matched by ``pattern``.
    Used to check that a delegated scope never exceeds what the delegator holds."""
    return bool(glob_regex(pattern).match(narrower.replace("*", "\x00")))


_TEMPLATE = re.compile(r"\{claims\.([A-Za-z0-9_.-]+)\}")


def _claim_text(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    return None


def _render(pattern: str, claims: Mapping[str, Any]) -> str | None:
    """Fill ``{claims.x}``; a literal '*' in a value is kept out of the glob syntax."""
    missing = False

    def sub(m: re.Match[str]) -> str:
        nonlocal missing
        value = _claim_text(claims, m.group(1))
        if value is None or not value:
            missing = True
            return ""
        return value.replace("*", "\x01")  # a character no resource contains: '*' can't widen

    out = _TEMPLATE.sub(sub, pattern)
    return None if missing else out


def _match(pattern: str, value: str) -> bool:
    return bool(glob_regex(pattern).match(value))


@dataclass(frozen=True)
class _Compiled:
    ref: str
    rule: Rule

    def matches_principal(self, who: Subject) -> bool:
        p = self.rule.principals
        if p.issuer is not None and not _match(p.issuer, who.issuer):
            return False
        if p.subject is not None and not _match(p.subject, who.subject):
            return False
        if p.roles is not None and not (set(p.roles) & who.roles):
            return False
        for name, wanted in p.claims.items():
            have = who.claims.get(name)
            values = have if isinstance(have, list) else [have]
            options = wanted if isinstance(wanted, list) else [wanted]
            if not any(isinstance(v, (str, int)) and _match(o, str(v)) for v in values for o in options):
                return False
        return True

    def allows(self, who: Subject, action: str, connector: str | None, resource: str | None) -> bool:
        if "*" not in self.rule.actions and action not in self.rule.actions:
            return False
        if not self.matches_principal(who):
            return False
        if connector is not None and not any(_match(c, connector) for c in self.rule.connectors):
            return False
        if resource is not None:
            rendered = [_render(r, who.claims) for r in self.rule.resources]
            if not any(r is not None and _match(r, resource) for r in rendered):
                return False
        return True

    @property
    def max_ttl(self) -> timedelta | None:
        s = self.rule.max_ttl_seconds
        return timedelta(seconds=s) if s is not None else None


class PolicySet:
    """An immutable, compiled snapshot of every policy; swapped whole on change."""

    def __init__(self, documents: Iterable[tuple[str, PolicyDocument]] = (), version: object = None) -> None:
        rules = [_Compiled(f"builtin/{name}", rule) for name, rule in BUILTIN.items()]
        for name, doc in sorted(documents, key=lambda x: x[0]):
            rules += [_Compiled(f"{name}/{i}", rule) for i, rule in enumerate(doc.rules)]
        self._rules = tuple(rules)
        self.version = version
        # Decisions for subjects without claims, memoised for the life of this (immutable) set.
        self._memo: dict[tuple[Any, ...], Decision] = {}

    def decide(self, who: Subject, action: str, connector: str | None = None, resource: str | None = None) -> Decision:
        if who.claims:  # claims feed templates and claim matches: decide afresh
            return self._decide(who, action, connector, resource)
        key = (who.issuer, who.subject, who.roles, action, connector, resource)
        decision = self._memo.get(key)
        if decision is None:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            decision = self._memo[key] = self._decide(who, action, connector, resource)
        return decision

    def _decide(self, who: Subject, action: str, connector: str | None, resource: str | None) -> Decision:
        allowing = [r for r in self._rules if r.allows(who, action, connector, resource)]
        if not allowing:
            where = "".join(
                part for part in (f" on connector {connector!r}" if connector else "", f" for resource {resource!r}" if resource else "")
            )
            return Decision(False, None, f"no rule allows {action}{where} to {who.issuer}/{who.subject}")
        # The longest TTL wins (None = no limit from policy).
        best = max(allowing, key=lambda r: (r.max_ttl is None, r.max_ttl or timedelta(0)))
        return Decision(True, best.ref, best.rule.description or f"rule {best.ref} allows {action}", best.max_ttl)

