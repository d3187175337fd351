"""Plugins as the gateway sees them: the one explicit registry of backend and connector
types (:mod:`.registry`), configured backends by name (:mod:`.backends`: the mounts), and
configured connectors (:mod:`.connectors`: rows, material, resource patterns, and the
authorisation of connector material).

May import: identity (a principal's decisions on material), audit (its request context),
store, crypto, errors, and ``backends``/``connectors`` (lazily, through the registry).
Never issuing or web.
"""
