"""The HTTP face of the gateway: the FastAPI app, its routes (one module per resource),
request middleware (request ids, sizes, client address, the audit trail of each request),
rate limits, metrics, TLS serving, the request/response schemas, and the one mapping from
the error tree (:mod:`gateway.errors`) to HTTP responses (:mod:`gateway.web.errors`).

Owns: nothing durable; every decision is a service's. Routes call services and never build
a query. May import: the services (identity, policy, issuing, plugins, audit), the runtime,
store and crypto types, errors, settings. Imported by: the CLI's ``serve`` only.
"""
