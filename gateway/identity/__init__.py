"""Who is calling: principals, admin keys, the authenticator, trusted issuers
(JWT verification and claim mapping), OAuth2 clients and the token endpoint's logic,
gateway-signed tokens and their signing keys, token revocation, runs (delegation to a
pipeline run), single use of token ids (:mod:`.replay`), and the principal of a verified
client certificate.

May import: policy (a principal decides through the compiled policy set), audit (its
request context), store, crypto, errors. Never plugins, issuing or web.
"""
