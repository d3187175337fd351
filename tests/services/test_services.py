"""Prove the throwaway-service helpers work: scram PostgreSQL and moto in server mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from botocore.exceptions import ClientError

from .motoserver import MotoServer
from .pgcluster import PgCluster, find_pg_bin


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    """One scram-sha-256 cluster for the module."""
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One moto server for the module."""
    with MotoServer() as server:
        yield server


# -- PostgreSQL -------------------------------------------------------------


def test_find_pg_bin_has_binaries() -> None:
    bin_dir = find_pg_bin()
    assert isinstance(bin_dir, Path)
    for name in ("initdb", "pg_ctl", "postgres"):
        assert (bin_dir / name).is_file()


def test_cluster_running_on_loopback(pg: PgCluster) -> None:
    assert pg.host == "127.0.0.1"
    assert pg.port > 0
    assert pg.dsn() == f"postgresql://{pg.superuser}:{pg.password}@127.0.0.1:{pg.port}/postgres"
    with psycopg.connect(pg.dsn(), connect_timeout=5) as conn:
        hba = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules WHERE type = 'host'").fetchall()
        assert hba and {method for _, method in hba} == {"scram-sha-256"}
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)


def test_superuser_right_password_connects(pg: PgCluster) -> None:
    with psycopg.connect(pg.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (pg.superuser,)


def test_superuser_wrong_password_refused(pg: PgCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(password="not-" + pg.password), connect_timeout=5)


def test_expired_role_refused(pg: PgCluster) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True, connect_timeout=5) as admin:
        admin.execute("CREATE ROLE expiring LOGIN PASSWORD 'expiring-pw' VALID UNTIL 'infinity'")
        try:
            # The same password works while the role is valid ...
            with psycopg.connect(pg.dsn(user="expiring", password="expiring-pw"), connect_timeout=5) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("expiring",)
            # ... and is refused once VALID UNTIL is in the past.
            admin.execute("ALTER ROLE expiring VALID UNTIL '2000-01-01 00:00:00+00'")
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(pg.dsn(user="expiring", password="expiring-pw"), connect_timeout=5)
            # The client sees the generic message; the server log says why.
            assert 'User "expiring" has an expired password' in pg.log_file.read_text(errors="replace")
        finally:
            admin.execute("DROP ROLE IF EXISTS expiring")


def test_stop_removes_everything() -> None:
    cluster = PgCluster(password="p@ss word/:")
    with cluster:
        base = cluster.base_dir
        assert base is not None and base.is_dir()
        with psycopg.connect(cluster.dsn(), connect_timeout=5) as conn:  # password is URL-quoted
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not base.exists()
    assert cluster.port == 0
    with pytest.raises(RuntimeError):
        cluster.dsn()
    cluster.stop()  # idempotent


# -- moto --------------------------------------------------------------------


def test_moto_s3_roundtrip(moto: MotoServer) -> None:
    assert moto.endpoint_url.startswith("http://127.0.0.1:")
    s3 = moto.boto3_client("s3")
    s3.create_bucket(Bucket="credgate-test")
    s3.put_object(Bucket="credgate-test", Key="hello.txt", Body=b"hello moto")
    assert s3.get_object(Bucket="credgate-test", Key="hello.txt")["Body"].read() == b"hello moto"


def test_moto_assume_role_has_expiration(moto: MotoServer) -> None:
    sts = moto.boto3_client("sts")
    creds = sts.assume_role(
        RoleArn="arn:aws:iam::123456789012:role/credgate-test",
        RoleSessionName="credgate",
        DurationSeconds=900,
    )["Credentials"]
    assert isinstance(creds["Expiration"], datetime)
    assert creds["AccessKeyId"] and creds["SecretAccessKey"] and creds["SessionToken"]


def test_moto_reset_forgets_resources(moto: MotoServer) -> None:
    s3 = moto.boto3_client("s3")
    s3.create_bucket(Bucket="credgate-reset")
    moto.reset()
    assert "credgate-reset" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_moto_enable_auth_refuses_bogus_keys(moto: MotoServer) -> None:
    iam = moto.boto3_client("iam")
    iam.create_user(UserName="credgate-auth")
    iam.put_user_policy(
        UserName="credgate-auth",
        PolicyName="s3-list",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListAllMyBuckets", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName="credgate-auth")["AccessKey"]
    real = moto.boto3_client("s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    bogus = moto.boto3_client("s3", aws_access_key_id="AKIABOGUSBOGUSBOGUS1", aws_secret_access_key="bogus")

    bogus.list_buckets()  # auth off: anything goes
    moto.enable_auth()
    try:
        with pytest.raises(ClientError) as refused:
            bogus.list_buckets()
        assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"
        # A real key with an allowing policy still works, so the refusal is about the key.
        real.list_buckets()
        # ... and its policy is enforced: it does not allow creating buckets.
        with pytest.raises(ClientError) as denied:
            real.create_bucket(Bucket="credgate-denied")
        assert denied.value.response["Error"]["Code"] == "AccessDenied"
    finally:
        moto.disable_auth()
    bogus.list_buckets()  # off again
