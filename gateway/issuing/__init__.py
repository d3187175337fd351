"""Issuing credentials: the issuing service (:mod:`.service`: plan, pending lease,
issue at the target, activate), leases (:mod:`.leases`: the durable record and the one TTL
calculation), wrap tokens (:mod:`.wrapping`) and the reaper (:mod:`.reaper`: expiry,
crashed issuances, revocation retries, one leader among replicas).

May import: plugins, identity, policy, audit, store, crypto, errors, and ``connectors.base``.
Never web.
"""
