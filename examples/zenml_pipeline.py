"""A ZenML pipeline whose step reads an S3 bucket through the ``credgate`` service connector.

The step asks ZenML for a connector client, as any stack component does; the ``credgate``
connector (holding a credgate OAuth2 client) mints a credgate run token for this pipeline run
(run id ``zenml-<ZenML run id>``), and the step's ``connect()`` issues short-lived AWS keys
with it (a lease in credgate, on the run). docs/zenml.md says how to run it against a local
ZenML and a local gateway::

    python examples/zenml_pipeline.py --setup                        # create the ZenML connector once
    python examples/zenml_pipeline.py --bucket ml-features

``--setup`` reads CREDGATE_ADDR, CREDGATE_CLIENT_ID and CREDGATE_CLIENT_SECRET and creates
the ZenML connector ``--connector`` (default ``credgate-aws``) for credgate connector
``--credgate-connector`` (default ``aws``).
"""

from __future__ import annotations

import argparse
import os
from typing import List

import credgate_zenml.service_connector  # noqa: F401  (registers the type; the entry point does too)
from zenml import pipeline, step
from zenml.client import Client


@step
def list_bucket(connector: str, bucket: str) -> List[str]:
    """The bucket's keys, read with credentials credgate issued for this run."""
    client = Client().get_service_connector_client(connector, resource_type="s3-bucket", resource_id=f"s3://{bucket}")
    print(f"credgate run {client.config.run_id}")  # the run token's run, not the client secret
    s3 = client.connect()  # a boto3 S3 client, as ZenML's AWS connector returns
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


@step
def report(keys: List[str]) -> int:
    for key in keys:
        print(f"  {key}")
    print(f"{len(keys)} object(s)")
    return len(keys)


@pipeline(enable_cache=False)
def credgate_s3_pipeline(connector: str, bucket: str) -> None:
    report(list_bucket(connector, bucket))


def setup(name: str, credgate_connector: str) -> None:
    env = os.environ
    missing = [k for k in ("CREDGATE_ADDR", "CREDGATE_CLIENT_ID", "CREDGATE_CLIENT_SECRET") if not env.get(k)]
    if missing:
        raise SystemExit(f"--setup needs {', '.join(missing)} in the environment")
    Client().create_service_connector(
        name=name, connector_type="credgate", auth_method="client-credentials", expiration_seconds=3600,
        configuration={"addr": env["CREDGATE_ADDR"], "client_id": env["CREDGATE_CLIENT_ID"],
                       "client_secret": env["CREDGATE_CLIENT_SECRET"], "connector": credgate_connector,
                       "ttl_seconds": 900},
    )
    print(f"ZenML connector {name!r} (credgate connector {credgate_connector!r}) created")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", help="the S3 bucket to list (a credgate resource s3-bucket:NAME)")
    parser.add_argument("--connector", default="credgate-aws", help="the ZenML service connector")
    parser.add_argument("--credgate-connector", default="aws", help="the credgate connector (for --setup)")
    parser.add_argument("--setup", action="store_true", help="create the ZenML connector and exit")
    args = parser.parse_args()
    if args.setup:
        setup(args.connector, args.credgate_connector)
        return
    if not args.bucket:
        parser.error("--bucket is required to run the pipeline")
    run = credgate_s3_pipeline(connector=args.connector, bucket=args.bucket)
    if run is not None:
        run = Client().get_pipeline_run(run.id)
        print(f"ZenML run {run.id}: {run.status}; {run.steps['report'].output.load()} object(s)")


if __name__ == "__main__":
    main()
