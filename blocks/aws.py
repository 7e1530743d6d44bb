"""The one place slurmctl builds prefect-aws ``AwsCredentials``: the usual AWS environment, an optional endpoint
(a moto server, another S3-compatible store) and botocore's retry mode for throttling and 5xx (``AWS_RETRIES``,
shared with the plain stores of ``slurmctl.storage``)."""

from __future__ import annotations

from prefect_aws import AwsClientParameters, AwsCredentials

from slurmctl.storage.base import AWS_RETRIES as RETRIES


def aws_credentials(endpoint_url: str | None = None, region: str | None = None) -> AwsCredentials:
    return AwsCredentials(region_name=region, aws_client_parameters=AwsClientParameters(
        endpoint_url=endpoint_url, config=RETRIES))
