"""Keys and encryption: the versioned key-encryption key (:mod:`.keyring`), envelope
encryption with AES-256-GCM under per-record data keys (:mod:`.envelope`), and KEK rotation
(:mod:`.rotation`: re-wrapping every sealed column, found through the store's registry of
sealed tables).

May import: store (rotation walks the sealed tables), errors. Nothing above.
"""
