"""The test OpenID provider speaks real OAuth 2.0 / OpenID Connect over HTTP."""

from __future__ import annotations

import base64
import hashlib
import secrets
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import KeySet

from .oidc_provider import OIDCProvider

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLI = "credgate-cli"
SVC = "credgate-svc"
SVC_SECRET = "svc-" + secrets.token_hex(8)
CALLBACK = "http://127.0.0.1:9/callback"


@pytest.fixture(scope="module")
def idp() -> Iterator[OIDCProvider]:
    with OIDCProvider() as provider:
        provider.register_client(CLI, public=True, redirect_uris=[CALLBACK])
        provider.register_client(SVC, secret=SVC_SECRET, redirect_uris=[CALLBACK])
        yield provider


@pytest.fixture
def http(idp: OIDCProvider) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=idp.issuer, trust_env=False, timeout=10) as client:
        yield client


def verify_jwt(http: httpx.Client, token: str, *, audience: str) -> dict[str, Any]:
    """Verify ``token`` as a relying party would: keys from ``jwks_uri``, RS256 only."""
    config = http.get("/.well-known/openid-configuration").json()
    keys = KeySet.import_key_set(httpx.get(config["jwks_uri"], trust_env=False).json())
    decoded = jwt.decode(token, keys, algorithms=["RS256"])
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": config["issuer"]},
        aud={"essential": True, "value": audience},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
    ).validate(decoded.claims)
    return decoded.claims


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


# ----------------------------------------------------------------------------- discovery


def test_discovery_advertises_every_endpoint(idp: OIDCProvider, http: httpx.Client) -> None:
    config = http.get("/.well-known/openid-configuration").json()

    OpenIDProviderMetadata(config).validate()
    assert config["issuer"] == idp.issuer == f"http://127.0.0.1:{idp.port}"
    for key, path in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("device_authorization_endpoint", "/device_authorization"),
        ("jwks_uri", "/jwks"),
        ("userinfo_endpoint", "/userinfo"),
    ]:
        assert config[key] == idp.issuer + path
    assert set(config["grant_types_supported"]) == {"authorization_code", "client_credentials", DEVICE_GRANT}
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "none" in config["token_endpoint_auth_methods_supported"]


def test_jwks_serves_the_public_signing_key(idp: OIDCProvider, http: httpx.Client) -> None:
    (key,) = http.get("/jwks").json()["keys"]

    assert key == idp.signing_jwk_public()
    assert key["kty"] == "RSA" and key["kid"] == idp.kid and key["use"] == "sig"
    assert "d" not in key and "p" not in key


# ----------------------------------------------------------------------------- device flow


def start_device_flow(http: httpx.Client, **extra: str) -> dict[str, Any]:
    response = http.post("/device_authorization", data={"client_id": CLI, "scope": "openid email groups", **extra})
    assert response.status_code == 200, response.text
    return response.json()


def poll(http: httpx.Client, device_code: str) -> httpx.Response:
    return http.post("/token", data={"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": CLI})


def test_device_flow_gives_a_verifiable_id_token_after_approval(idp: OIDCProvider, http: httpx.Client) -> None:
    device = start_device_flow(http, nonce="n-0S6_WzA2Mj")
    assert device["interval"] == 1 and device["expires_in"] > 0
    assert device["verification_uri"] == f"{idp.issuer}/device"
    assert device["verification_uri_complete"].endswith(f"user_code={device['user_code']}")
    assert http.get(device["verification_uri_complete"]).status_code == 200

    pending = poll(http, device["device_code"])
    assert (pending.status_code, pending.json()["error"]) == (400, "authorization_pending")
    too_fast = poll(http, device["device_code"])  # well within the 1 s interval
    assert (too_fast.status_code, too_fast.json()["error"]) == (400, "slow_down")

    idp.approve_device(device["user_code"].lower(), "alice")  # user codes are case-insensitive
    granted = poll(http, device["device_code"])

    assert granted.status_code == 200, granted.text
    tokens = granted.json()
    assert tokens["token_type"] == "Bearer" and tokens["access_token"]
    claims = verify_jwt(http, tokens["id_token"], audience=CLI)
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.com"
    assert claims["groups"] == ["credgate-admins"]
    assert claims["nonce"] == "n-0S6_WzA2Mj"
    assert jwt.decode(tokens["id_token"], KeySet.import_key_set(idp.jwks())).header["kid"] == idp.kid

    userinfo = http.get("/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert userinfo.status_code == 200
    assert userinfo.json() == {"sub": "alice", "email": "alice@example.com", "groups": ["credgate-admins"]}

    again = poll(http, device["device_code"])  # a device code is good for one token response
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")


def test_device_flow_denied(idp: OIDCProvider, http: httpx.Client) -> None:
    device = start_device_flow(http)
    idp.deny_device(device["user_code"])

    denied = poll(http, device["device_code"])

    assert (denied.status_code, denied.json()["error"]) == (400, "access_denied")


def test_device_flow_for_bob_has_his_groups_and_no_email(idp: OIDCProvider, http: httpx.Client) -> None:
    device = start_device_flow(http)
    idp.approve_device(device["user_code"], "bob")

    claims = verify_jwt(http, poll(http, device["device_code"]).json()["id_token"], audience=CLI)

    assert claims["sub"] == "bob" and claims["groups"] == ["ml-team"] and "email" not in claims


def test_device_flow_expired_code() -> None:
    with OIDCProvider(device_code_ttl=0) as short_lived:
        short_lived.register_client(CLI, public=True)
        with httpx.Client(base_url=short_lived.issuer, trust_env=False, timeout=10) as http:
            device = start_device_flow(http)
            short_lived.approve_device(device["user_code"], "alice")

            expired = poll(http, device["device_code"])

    assert (expired.status_code, expired.json()["error"]) == (400, "expired_token")


def test_device_authorization_refuses_unknown_client(http: httpx.Client) -> None:
    response = http.post("/device_authorization", data={"client_id": "nobody", "scope": "openid"})

    assert response.json()["error"] == "invalid_client"


def test_approve_unknown_user_code_or_user_raises(idp: OIDCProvider, http: httpx.Client) -> None:
    device = start_device_flow(http)
    with pytest.raises(KeyError):
        idp.approve_device("BCDF-GHJK", "alice")
    with pytest.raises(KeyError):
        idp.approve_device(device["user_code"], "mallory")


# ----------------------------------------------------------------------------- code + PKCE


def authorize(http: httpx.Client, **params: str) -> httpx.Response:
    query = {
        "client_id": CLI,
        "response_type": "code",
        "redirect_uri": CALLBACK,
        "scope": "openid email groups",
        "state": "st-" + secrets.token_hex(4),
        "login_hint": "alice",
        **params,
    }
    return http.get("/authorize", params={k: v for k, v in query.items() if v is not None})


def redirect_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == CALLBACK
    return {k: v[0] for k, v in parse_qs(location.query).items()}


def exchange(http: httpx.Client, code: str, verifier: str | None) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "client_id": CLI}
    if verifier is not None:
        data["code_verifier"] = verifier
    return http.post("/token", data=data)


def test_code_flow_refuses_a_wrong_code_verifier(http: httpx.Client) -> None:
    verifier = secrets.token_urlsafe(48)
    params = redirect_params(authorize(http, code_challenge=s256(verifier), code_challenge_method="S256"))

    wrong = exchange(http, params["code"], secrets.token_urlsafe(48))
    missing = exchange(http, params["code"], None)

    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")


def test_code_flow_with_the_right_code_verifier_returns_an_id_token(http: httpx.Client) -> None:
    verifier = secrets.token_urlsafe(48)
    response = authorize(http, code_challenge=s256(verifier), code_challenge_method="S256", state="xyz", nonce="abc")
    params = redirect_params(response)
    assert params["state"] == "xyz"

    tokens = exchange(http, params["code"], verifier)

    assert tokens.status_code == 200, tokens.text
    claims = verify_jwt(http, tokens.json()["id_token"], audience=CLI)
    assert claims["sub"] == "alice" and claims["groups"] == ["credgate-admins"] and claims["nonce"] == "abc"
    replay = exchange(http, params["code"], verifier)
    assert replay.json()["error"] == "invalid_grant"


def test_code_flow_with_authlib_client(idp: OIDCProvider) -> None:
    with warnings.catch_warnings():  # authlib 1.9 deprecates plain httpx in favour of httpx2
        warnings.filterwarnings("ignore", message="The httpx module is deprecated")
        from authlib.integrations.httpx_client import OAuth2Client
    verifier = secrets.token_urlsafe(48)
    with OAuth2Client(
        CLI,
        redirect_uri=CALLBACK,
        scope="openid groups",
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        trust_env=False,
    ) as client:
        url, state = client.create_authorization_url(
            f"{idp.issuer}/authorize", code_verifier=verifier, login_hint="bob"
        )
        redirect = httpx.get(url, trust_env=False)  # the browser's leg
        token = client.fetch_token(
            f"{idp.issuer}/token",
            authorization_response=redirect.headers["location"],
            state=state,
            code_verifier=verifier,
        )
    with httpx.Client(base_url=idp.issuer, trust_env=False) as http:
        claims = verify_jwt(http, token["id_token"], audience=CLI)
    assert claims["sub"] == "bob" and claims["groups"] == ["ml-team"]


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({}, "invalid_request"),  # a public client must use PKCE
        ({"code_challenge": s256("x" * 43), "code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": s256("x" * 43)}, "invalid_request"),  # omitted method means plain
        ({"code_challenge": "short", "code_challenge_method": "S256"}, "invalid_request"),
        ({"code_challenge": s256("x" * 43), "code_challenge_method": "S256", "login_hint": None}, "login_required"),
        ({"code_challenge": s256("x" * 43), "code_challenge_method": "S256", "login_hint": "eve"}, "login_required"),
    ],
)
def test_authorize_redirects_errors_to_a_valid_redirect_uri(
    http: httpx.Client, params: dict[str, str], error: str
) -> None:
    response = authorize(http, state="s1", **params)

    got = redirect_params(response)
    assert got["error"] == error and got["state"] == "s1" and "code" not in got


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"client_id": "nobody"}, "invalid_client"),
        ({"redirect_uri": "http://127.0.0.1:9/evil"}, "invalid_request"),
    ],
)
def test_authorize_answers_400_without_a_trusted_redirect_uri(
    http: httpx.Client, params: dict[str, str], error: str
) -> None:
    response = authorize(http, code_challenge=s256("x" * 43), code_challenge_method="S256", **params)

    assert response.status_code == 400
    assert response.json()["error"] == error


def test_confidential_client_code_flow_without_pkce(http: httpx.Client) -> None:
    params = redirect_params(authorize(http, client_id=SVC))

    tokens = http.post(
        "/token",
        data={"grant_type": "authorization_code", "code": params["code"], "redirect_uri": CALLBACK},
        auth=(SVC, SVC_SECRET),
    )

    assert tokens.status_code == 200, tokens.text
    assert verify_jwt(http, tokens.json()["id_token"], audience=SVC)["sub"] == "alice"


# ----------------------------------------------------------------------------- client credentials


def test_client_credentials_for_a_confidential_client(http: httpx.Client) -> None:
    basic = http.post("/token", data={"grant_type": "client_credentials", "scope": "openid"}, auth=(SVC, SVC_SECRET))
    post = http.post("/token", data={"grant_type": "client_credentials", "client_id": SVC, "client_secret": SVC_SECRET})

    for response in (basic, post):
        assert response.status_code == 200, response.text
        assert response.json()["token_type"] == "Bearer" and response.json()["access_token"]
        assert "id_token" not in response.json()
    userinfo = http.get("/userinfo", headers={"Authorization": f"Bearer {basic.json()['access_token']}"})
    assert userinfo.status_code == 401  # no user behind a client_credentials token


def test_client_credentials_refuses_a_wrong_secret_and_public_clients(http: httpx.Client) -> None:
    wrong = http.post("/token", data={"grant_type": "client_credentials"}, auth=(SVC, "wrong"))
    public = http.post("/token", data={"grant_type": "client_credentials", "client_id": CLI})

    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    assert public.json()["error"] == "invalid_client"


def test_userinfo_refuses_unknown_tokens(http: httpx.Client) -> None:
    assert http.get("/userinfo").status_code == 401
    assert http.get("/userinfo", headers={"Authorization": "Bearer nope"}).status_code == 401


# ----------------------------------------------------------------------------- sign()


def test_sign_produces_tokens_that_verify_against_jwks(idp: OIDCProvider, http: httpx.Client) -> None:
    token = idp.sign(idp.id_token_claims("alice", "some-audience", extra="x"))

    claims = verify_jwt(http, token, audience="some-audience")

    assert claims["sub"] == "alice" and claims["extra"] == "x" and claims["groups"] == ["credgate-admins"]


def test_sign_can_forge_tokens_a_verifier_must_refuse(idp: OIDCProvider) -> None:
    keys = KeySet.import_key_set(idp.jwks())
    claims = idp.id_token_claims("alice", CLI)
    unknown_kid = idp.sign(claims, kid="not-ours")
    alg_none = idp.sign(claims, alg="none")
    confused = idp.sign(claims, alg="HS256")  # HMAC keyed with the public key PEM

    assert jwt.decode(unknown_kid, keys.keys[0], algorithms=["RS256"]).header["kid"] == "not-ours"
    with pytest.raises(JoseError):
        jwt.decode(unknown_kid, keys, algorithms=["RS256"])
    for forged in (alg_none, confused):
        with pytest.raises(JoseError):
            jwt.decode(forged, keys, algorithms=["RS256"])
    with pytest.raises(BadSignatureError):
        other = OIDCProvider().start()
        try:
            jwt.decode(other.sign(claims, kid=idp.kid), keys, algorithms=["RS256"])
        finally:
            other.stop()
