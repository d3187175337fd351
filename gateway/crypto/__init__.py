"""Keys and encryption: the versioned key-encryption key (:mod:`.keyring`: a file or an
env var; :mod:`.kmsring`: KEK versions held wrapped by a customer's KMS), envelope
encryption with AES-256-GCM under per-record data keys (:mod:`.envelope`), and KEK rotation
(:mod:`.rotation`: re-wrapping every sealed column, found through the store's registry of
sealed tables; following a rotation of the KMS key).

May import: store (rotation walks the sealed tables; the KMS key ring keeps its wrapped
versions there), errors, and for type annotations only :mod:`kms.base` (the KEK source
protocol: the runtime builds the source and hands it in, so no vendor SDK is reached from
here). Nothing above.
"""
