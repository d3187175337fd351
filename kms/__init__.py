"""KEK sources: credgate's key-encryption key held in a customer's KMS (a plugin package).

Owns the clients of the key-management services that can hold the root key of
credgate's own store, and the protocol they follow:

- :mod:`kms.base`: the :class:`~kms.base.KekSource` protocol, what a source wraps and
  unwraps, the errors it raises, and :func:`~kms.base.kms_call` (a synchronous SDK
  call off the event loop, under a deadline, counted);
- :mod:`kms.aws`: ``aws-kms``, a customer-managed AWS KMS key (boto3);
- :mod:`kms.vault_transit`: ``vault-transit``, a key of a Vault or OpenBao transit
  engine (hvac).

A source only wraps and unwraps the gateway's KEK versions (32 random bytes each)
under the KMS key, and says which version of the KMS key does it; the key ring
(:mod:`gateway.crypto.kmsring`) keeps the unwrapped versions in memory and does all
the envelope encryption locally, so the KMS key itself never leaves the KMS and a
secret read or write costs no KMS call.

May import: :mod:`gateway.errors` (the plugin-facing errors), :mod:`connectors.base`
(``run_sync``, ``generic_sanitize``), pydantic, and its vendor SDK (boto3/botocore,
hvac) inside functions of its own module only, so the types are listable without
their SDK. Nothing of the gateway's services, store, crypto or web: the runtime
builds a source through ``gateway.plugins.registry.KEK_SOURCES`` and hands it to
the key ring.
"""
