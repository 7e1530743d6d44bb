"""The one place slurmctl builds prefect-aws ``AwsCredentials``: the usual AWS environment, an optional endpoint
(a moto server, another S3-compatible store) and botocore's retry mode for throttling and 5xx.

Standard mode, not adaptive: adaptive adds a client-side rate limiter that, after one throttling answer, slows a
sequential client to about one request per second — far worse than the backoff it replaces for our workloads.
"""

from __future__ import annotations

from prefect_aws import AwsClientParameters, AwsCredentials

RETRIES = {"retries": {"mode": "standard", "max_attempts": 10}}


def aws_credentials(endpoint_url: str | None = None, region: str | None = None) -> AwsCredentials:
    return AwsCredentials(region_name=region, aws_client_parameters=AwsClientParameters(
        endpoint_url=endpoint_url, config=RETRIES))
