"""The aws connector against moto in server mode (one server for the module).

moto does not enforce session policies, so the S3 scoping is proven by
evaluating the generated policy document here (``allows``), and the
end-to-end tests prove the STS calls, their parameters and the credentials.
"""

from __future__ import annotations

import fnmatch
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from connectors.aws import AWSConfig, AWSConnector, AWSKeysMaterial, federation_name, parse_resource, session_policy
from connectors.base import (
    IssueRequest,
    ResourceNotSupported,
    Revocability,
    ServiceConnector,
    TargetError,
    TargetUnreachable,
)
from gateway.errors import NotRenewable, ValidationFailed
from tests.conftest import service_missing
from tests.services.motoserver import MotoServer
from tests.services.pgcluster import free_port

ACCOUNT = "123456789012"  # moto's default account
ALLOWED, OTHER = "cg-allowed", "cg-other"
TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "sts:AssumeRole"}],
}


@dataclass
class Account:
    moto: MotoServer
    user_arn: str
    key_id: str
    secret: str
    role_arn: str


@pytest.fixture(scope="module")
def aws() -> Iterator[Account]:
    server = MotoServer()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any failure means moto can't run here
        service_missing("moto server", type(exc).__name__)
    try:
        iam = server.boto3_client("iam")
        user = iam.create_user(UserName="credgate-admin")["User"]
        key = iam.create_access_key(UserName="credgate-admin")["AccessKey"]
        role = iam.create_role(
            RoleName="cg-s3", AssumeRolePolicyDocument=json.dumps(TRUST), MaxSessionDuration=43200
        )["Role"]
        s3 = server.boto3_client("s3")
        for bucket in (ALLOWED, OTHER):
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="report.txt", Body=f"in {bucket}".encode())
        yield Account(server, user["Arn"], key["AccessKeyId"], key["SecretAccessKey"], role["Arn"])
    finally:
        server.stop()


def connector(aws: Account, auth: str = "iam-role", secret: str | None = None, **config: Any) -> AWSConnector:
    config.setdefault("endpoint_url", aws.moto.endpoint_url)
    if auth == "iam-role":
        config.setdefault("role_arn", aws.role_arn)
    material = AWSKeysMaterial(aws_access_key_id=aws.key_id, aws_secret_access_key=secret or aws.secret)
    return AWSConnector(AWSConfig(**config), auth, material)


def lease(conn: AWSConnector, resource: str, ttl: int = 3600) -> IssueRequest:
    lease_id = f"lease_{int(datetime.now().timestamp() * 1000):012x}{secrets.token_hex(8)}"
    return IssueRequest(
        lease_id=lease_id,
        resource=resource,
        ttl=timedelta(seconds=ttl),
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
        revoke_state=conn.plan(lease_id, resource),
        timeout_seconds=15,
    )


def capture(conn: AWSConnector, operation: str) -> list[dict[str, Any]]:
    """Record the parameters of every ``operation`` call the connector's STS client makes."""
    seen: list[dict[str, Any]] = []
    conn._client("sts").meta.events.register(
        f"provide-client-params.sts.{operation}", lambda params, **_: seen.append(dict(params))
    )
    return seen


def allows(policy: dict[str, Any], action: str, resource: str) -> bool:
    """Whether any Allow statement covers ``action`` on ``resource`` (IAM wildcards * and ?).

    Enough for the policies this connector writes: no Deny, NotAction or Condition.
    """
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and set(st) == {"Effect", "Action", "Resource"}
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions) and any(
            fnmatch.fnmatchcase(resource, r) for r in resources
        ):
            return True
    return False


def s3_client(aws: Account, credential: dict[str, str]) -> Any:
    return aws.moto.boto3_client(
        "s3",
        aws_access_key_id=credential["aws_access_key_id"],
        aws_secret_access_key=credential["aws_secret_access_key"],
        aws_session_token=credential["aws_session_token"],
        region_name=credential["region"],
        endpoint_url=credential["endpoint_url"],
    )


# -- pure ----------------------------------------------------------------------


def test_metadata() -> None:
    assert AWSConnector.type == "aws"
    assert set(AWSConnector.auth_methods) == {"secret-key", "iam-role", "web-identity"}
    assert set(AWSConnector.resource_types) == {"s3-bucket", "aws-generic"}
    assert AWSConnector.revocability is Revocability.EXPIRY_ONLY
    assert AWSConnector.renewable is False and AWSConnector.wrap_only is False
    assert (AWSConnector.ttl.default, AWSConnector.ttl.min, AWSConnector.ttl.max) == (
        timedelta(hours=1), timedelta(seconds=900), timedelta(hours=12),
    )
    material = AWSKeysMaterial(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="s")
    conn = AWSConnector(AWSConfig(role_arn=f"arn:aws:iam::{ACCOUNT}:role/r"), "iam-role", material)
    assert isinstance(conn, ServiceConnector)
    assert conn.credential_type == "assume-role"
    assert AWSConnector(AWSConfig(), "secret-key", material).credential_type == "federation-token"


def test_session_policy_documents() -> None:
    assert session_policy("s3-bucket:my-data") == {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::my-data", "arn:aws:s3:::my-data/*"]}
        ],
    }
    assert session_policy("s3-bucket:my-data", "federation-token") == session_policy("s3-bucket:my-data")
    assert session_policy("aws-generic") is None
    assert session_policy("aws-generic", "federation-token") == {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    assert session_policy("aws-generic", "session-token") is None
    with pytest.raises(ResourceNotSupported, match="can't be scoped"):
        session_policy("s3-bucket:my-data", "session-token")
    cn = session_policy("s3-bucket:my-data", partition="aws-cn")
    assert cn is not None and cn["Statement"][0]["Resource"][0] == "arn:aws-cn:s3:::my-data"


def test_s3_policy_grants_exactly_the_bucket_and_its_objects() -> None:
    policy = session_policy(f"s3-bucket:{ALLOWED}")
    assert policy is not None
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert allows(policy, action, f"arn:aws:s3:::{ALLOWED}/report.txt")
        assert allows(policy, action, f"arn:aws:s3:::{ALLOWED}/deep/key")
        assert not allows(policy, action, f"arn:aws:s3:::{OTHER}/report.txt")
        assert not allows(policy, action, f"arn:aws:s3:::{ALLOWED}-evil/report.txt")
    assert allows(policy, "s3:ListBucket", f"arn:aws:s3:::{ALLOWED}")
    for arn in (f"arn:aws:s3:::{OTHER}", f"arn:aws:s3:::{ALLOWED}x", f"arn:aws:s3:::{ALLOWED}.copy", "arn:aws:s3:::*"):
        assert not allows(policy, "s3:ListBucket", arn)
    assert not allows(policy, "s3:ListAllMyBuckets", "*")
    assert not allows(policy, "iam:CreateUser", f"arn:aws:s3:::{ALLOWED}")
    assert not allows(policy, "ec2:RunInstances", "*")
    generic = session_policy("aws-generic", "federation-token")
    assert generic is not None and allows(generic, "ec2:RunInstances", "*")


@pytest.mark.parametrize("bucket", ["abc", "my.bucket-1", "a" * 63, "0bucket9"])
def test_bucket_names_accepted(bucket: str) -> None:
    assert parse_resource(f"s3-bucket:{bucket}") == ("s3-bucket", bucket)


@pytest.mark.parametrize(
    "resource",
    ["s3-bucket:ab", "s3-bucket:Abc", "s3-bucket:-abc", "s3-bucket:abc-", "s3-bucket:a..b", "s3-bucket:192.168.1.1",
     "s3-bucket:" + "a" * 64, "s3-bucket:", "s3-bucket:abc/key", "s3-bucket:ab_c", "bucket:abc", "aws-generic:x", "*", ""],
)
def test_bad_resources_refused(resource: str) -> None:
    with pytest.raises(ResourceNotSupported):
        parse_resource(resource)


def test_config_combinations() -> None:
    material = AWSKeysMaterial(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="s")
    arn = f"arn:aws:iam::{ACCOUNT}:role/r"
    with pytest.raises(ValidationFailed, match="role_arn"):
        AWSConnector(AWSConfig(), "iam-role", material)
    with pytest.raises(ValidationFailed, match="can't make federation-token"):
        AWSConnector(AWSConfig(credential_type="federation-token"), "iam-role", material)
    with pytest.raises(ValidationFailed, match="can't make assume-role"):
        AWSConnector(AWSConfig(credential_type="assume-role", role_arn=arn), "secret-key", material)
    with pytest.raises(ValidationFailed):
        AWSConnector(AWSConfig(), "access-key", material)
    for bad in (
        {"credential_type": "assume-role"},
        {"credential_type": "session-token", "role_arn": arn},
        {"external_id": "abc"},
        {"role_arn": "arn:aws:iam::123:role/r"},
        {"endpoint_url": "ftp://x"},
        {"endpoint_url": "https://user:pw@sts.example.com"},
        {"region": "US-EAST-1"},
        {"session_name_prefix": "has space"},
        {"credential_type": "web-identity"},
        {"unknown": 1},
    ):
        with pytest.raises(ValueError):
            AWSConfig(**bad)
    assert AWSConfig(endpoint_url="https://sts.example.com/").endpoint_url == "https://sts.example.com"
    # plain dicts are validated too, without quoting the input
    with pytest.raises(ValidationFailed) as info:
        AWSConnector({}, "secret-key", {"aws_access_key_id": "AKIA", "aws_secret_access_key": "s3cr3t-value", "x": "y"})
    assert "s3cr3t-value" not in info.value.message


def test_plan_is_pure_and_names_the_session() -> None:
    material = AWSKeysMaterial(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="s")
    role = AWSConnector(AWSConfig(role_arn=f"arn:aws:iam::{ACCOUNT}:role/r"), "iam-role", material)
    lease_id = "lease_0190aabbccdd" + "0123456789abcdef"
    assert role.plan(lease_id, "s3-bucket:abc") == {
        "session_name": f"credgate-{lease_id}",
        "credential_type": "assume-role",
    }
    assert role.plan(lease_id, "s3-bucket:abc") == role.plan(lease_id, "s3-bucket:abc")
    assert len(AWSConnector(AWSConfig(role_arn=role.config.role_arn, session_name_prefix="p" * 32), "iam-role", material)
               .plan(lease_id, "aws-generic")["session_name"]) == 64
    fed = AWSConnector(AWSConfig(), "secret-key", material).plan(lease_id, "aws-generic")
    assert fed["credential_type"] == "federation-token"
    assert fed["federated_user"] == "credgate-" + "0aabbccdd0123456789abcdef"[-23:]
    assert len(fed["federated_user"]) == 32
    for prefix in ("credgate", "x", "p" * 32):
        name = federation_name(prefix, lease_id)
        assert 2 <= len(name) <= 32 and name.endswith("0123456789abcdef")
    session = AWSConnector(AWSConfig(credential_type="session-token"), "secret-key", material)
    assert session.validate_resource("aws-generic") == "aws-generic"
    with pytest.raises(ResourceNotSupported, match="can't be scoped"):
        session.validate_resource("s3-bucket:abc")
    with pytest.raises(ResourceNotSupported):
        session.plan(lease_id, "s3-bucket:abc")


async def test_renew_refused_and_revoke_is_a_noop() -> None:
    material = AWSKeysMaterial(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="s")
    conn = AWSConnector(AWSConfig(), "secret-key", material)
    with pytest.raises(NotRenewable) as info:
        await conn.renew({"session_name": "x"}, datetime.now(UTC))
    assert info.value.code == "not_renewable" and info.value.status == 409
    assert await conn.revoke({"session_name": "x", "credential_type": "federation-token"}) is None
    assert await conn.revoke({}) is None


# -- against moto ----------------------------------------------------------------


async def test_assume_role_credentials_reach_the_bucket(aws: Account) -> None:
    conn = connector(aws, external_id="ext-123")
    calls = capture(conn, "AssumeRole")
    req = lease(conn, f"s3-bucket:{ALLOWED}", ttl=7200)
    issued = await conn.issue(req)
    now = datetime.now(UTC)

    cred = issued.credential
    assert set(cred) == {
        "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region", "endpoint_url", "expiration",
    }
    assert cred["region"] == "us-east-1" and cred["endpoint_url"] == aws.moto.endpoint_url
    assert cred["aws_access_key_id"] != aws.key_id
    assert issued.expires_at <= req.expires_at
    assert abs((issued.expires_at - now).total_seconds() - 7200) < 5
    assert datetime.fromisoformat(cred["expiration"]) == issued.expires_at

    (params,) = calls
    assert params["RoleArn"] == aws.role_arn
    assert params["RoleSessionName"] == req.revoke_state["session_name"]
    assert params["DurationSeconds"] == 7200
    assert params["ExternalId"] == "ext-123"
    assert json.loads(params["Policy"]) == session_policy(f"s3-bucket:{ALLOWED}")

    s3 = s3_client(aws, cred)
    assert s3.get_object(Bucket=ALLOWED, Key="report.txt")["Body"].read() == f"in {ALLOWED}".encode()
    ident = aws.moto.boto3_client(
        "sts", aws_access_key_id=cred["aws_access_key_id"], aws_secret_access_key=cred["aws_secret_access_key"],
        aws_session_token=cred["aws_session_token"],
    ).get_caller_identity()
    assert ident["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/cg-s3/{req.revoke_state['session_name']}"
    await conn.revoke(req.revoke_state)  # expiry-only: a no-op that must not fail


async def test_assume_role_generic_sends_no_policy(aws: Account) -> None:
    conn = connector(aws)
    calls = capture(conn, "AssumeRole")
    await conn.issue(lease(conn, "aws-generic", ttl=900))
    (params,) = calls
    assert "Policy" not in params and "ExternalId" not in params
    assert params["DurationSeconds"] == 900


async def test_federation_token(aws: Account) -> None:
    conn = connector(aws, auth="secret-key")
    calls = capture(conn, "GetFederationToken")
    req = lease(conn, "aws-generic", ttl=5400)
    issued = await conn.issue(req)
    now = datetime.now(UTC)
    assert issued.credential["aws_session_token"]
    assert abs((issued.expires_at - now).total_seconds() - 5400) < 5
    (params,) = calls
    assert params["Name"] == req.revoke_state["federated_user"]
    assert params["DurationSeconds"] == 5400
    assert json.loads(params["Policy"]) == session_policy("aws-generic", "federation-token")

    req = lease(conn, f"s3-bucket:{OTHER}", ttl=900)
    await conn.issue(req)
    assert json.loads(calls[-1]["Policy"]) == session_policy(f"s3-bucket:{OTHER}")


async def test_session_token_is_unscoped(aws: Account) -> None:
    conn = connector(aws, auth="secret-key", credential_type="session-token")
    calls = capture(conn, "GetSessionToken")
    with pytest.raises(ResourceNotSupported, match="can't be scoped"):
        conn.plan("lease_x", f"s3-bucket:{ALLOWED}")
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("s3-bucket")
    issued = await conn.issue(lease(conn, "aws-generic", ttl=1800))
    assert calls == [{"DurationSeconds": 1800}]
    assert abs((issued.expires_at - datetime.now(UTC)).total_seconds() - 1800) < 5
    result = await conn.verify()
    assert result.ok and result.reachable == {}


async def test_verify_and_list_resources(aws: Account) -> None:
    conn = connector(aws)
    result = await conn.verify()
    assert result.ok and result.identity == aws.user_arn
    assert aws.user_arn in result.message
    assert {f"s3-bucket:{ALLOWED}", f"s3-bucket:{OTHER}"} <= set(result.reachable["s3-bucket"])
    listed = await conn.list_resources("s3-bucket")
    assert {f"s3-bucket:{ALLOWED}", f"s3-bucket:{OTHER}"} <= set(listed)
    assert all(conn.validate_resource(r) == "s3-bucket" for r in listed)
    assert await conn.list_resources("aws-generic") == ["aws-generic"]
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("ec2-instance")


async def test_with_auth_enforced_bad_keys_fail_without_leaking(aws: Account) -> None:
    bogus_secret = "bogus-" + secrets.token_hex(16)
    bogus = AWSConnector(
        AWSConfig(endpoint_url=aws.moto.endpoint_url, role_arn=aws.role_arn), "iam-role",
        AWSKeysMaterial(aws_access_key_id="AKIABOGUSBOGUSBOGUS", aws_secret_access_key=bogus_secret),
    )
    wrong_secret = connector(aws, secret="wrong-" + secrets.token_hex(16))
    good = connector(aws)
    texts: list[str] = []
    aws.moto.enable_auth()
    try:
        for conn in (bogus, wrong_secret):
            result = await conn.verify()
            assert not result.ok and result.identity is None and result.reachable == {}
            texts.append(result.message)
            with pytest.raises(TargetError) as info:
                await conn.issue(lease(conn, f"s3-bucket:{ALLOWED}"))
            assert not isinstance(info.value, TargetUnreachable)
            texts += [info.value.message, str(info.value), repr(info.value)]
        assert "InvalidClientTokenId" in texts[0]

        result = await good.verify()  # the user has no IAM policy: it may ask who it is, not list buckets
        assert result.ok and result.identity == aws.user_arn
        assert "not permitted" in result.message and result.reachable == {}
        with pytest.raises(TargetError) as info:
            await good.issue(lease(good, f"s3-bucket:{ALLOWED}"))
        assert "AccessDenied" in info.value.message
        texts.append(info.value.message)
    finally:
        aws.moto.disable_auth()
    for text in texts:
        for secret in (bogus_secret, wrong_secret._material.aws_secret_access_key.get_secret_value(), aws.secret):
            assert secret not in text
    assert (await good.verify()).ok


async def test_unreachable_endpoint(aws: Account) -> None:
    conn = connector(aws, endpoint_url=f"http://127.0.0.1:{free_port('127.0.0.1')}")
    result = await conn.verify()
    assert not result.ok and "could not be reached" in result.message
    with pytest.raises(TargetUnreachable) as info:
        await conn.issue(lease(conn, "aws-generic", ttl=900))
    assert info.value.status == 503 and aws.secret not in info.value.message


def test_sanitize_keeps_the_class_and_aws_error_code_never_the_message() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    exc = ClientError({"Error": {"Code": "AccessDenied", "Message": "arn:aws:iam::1:user/hunter2-canary"}}, "AssumeRole")
    assert AWSConnector.sanitize(exc) == "ClientError (AccessDenied)"
    assert AWSConnector.sanitize(EndpointConnectionError(endpoint_url="https://hunter2-canary")) == "EndpointConnectionError"
