"""The audit trail: one event per decision, never holding a secret value.

Owns: the request's audit context (:func:`trail.note`), events chained by an HMAC under a
sealed per-deployment key, checkpoints (in the store and in every sink), the sinks (store,
file, stdout), verification, search (:mod:`.search`), and keyed hashes of sensitive identifiers.

May import: store, crypto, errors, requestid. Never identity, policy, issuing or web: the
signing keys it may use to read legacy checkpoints are handed to it by the runtime.
"""
