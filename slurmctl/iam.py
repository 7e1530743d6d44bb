"""The least-privilege IAM policy of one job (``slurmctl iam-policy CONFIG``): what its coordinator and workers do on
AWS, and nothing else.

It follows what the code calls, per backend:

* the **manifest store** (``s3://bucket/prefix``): objects under ``<prefix>/jobs/<job_id>/`` (manifests, parts,
  outputs, the task cache), ``<prefix>/_probes/`` (admission proves create-if-absent there) and, with a DynamoDB
  limiter, ``<prefix>/rate-limits/`` (pause/rate signals, shared by the jobs of one store by design): Get, Put
  (conditional PUTs and multipart uploads included), Delete, multipart abort/list-parts; ``ListBucket`` only for
  those prefixes (``s3:prefix`` condition);
* an **S3 input**: ``GetObject`` on that one object (ranged reads are GETs);
* the **DynamoDB limiter**: ``GetItem``/``PutItem``/``UpdateItem`` on the table, only for items whose partition key
  is one of the job's limit keys (``dynamodb:LeadingKeys``), and ``DescribeTable`` (``CreateTable`` only with
  ``create_table``: admission creates a missing table);
* **SSE-KMS** (a store with ``sse_kms_key_id``): ``kms:GenerateDataKey`` and ``kms:Decrypt`` on that key (with the
  account's default ``aws/s3`` key, its own key policy already lets S3 use it for the account: no statement).

Resources are exact ARNs; the account and region of the DynamoDB table are ``*`` unless given.
"""

from __future__ import annotations

from typing import Any

from slurmctl.config import JobConfig

S3_OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                     "s3:ListMultipartUploadParts"]
DYNAMODB_ITEM_ACTIONS = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"]


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key.strip("/")


def _under(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def _kms_statement(key: str, account: str, region: str) -> dict[str, Any]:
    """Use of the store's KMS key. IAM matches KMS calls against the *key's* ARN, never an alias's: a key id becomes
    its key ARN; an alias (``alias/NAME`` or its ARN) allows the account's keys in that region only when the request
    names that alias (``kms:RequestAlias``, as S3 passes the configured ``SSEKMSKeyId`` on)."""
    statement: dict[str, Any] = {"Sid": "StoreEncryption", "Effect": "Allow",
                                 "Action": ["kms:GenerateDataKey", "kms:Decrypt"]}
    alias = key if key.startswith("alias/") else key.partition(":alias/")[1] and "alias/" + key.partition(":alias/")[2]
    if alias:
        return statement | {"Resource": [f"arn:aws:kms:{region}:{account}:key/*"],
                            "Condition": {"StringEquals": {"kms:RequestAlias": alias}}}
    arn = key if key.startswith("arn:") else f"arn:aws:kms:{region}:{account}:key/{key}"
    return statement | {"Resource": [arn]}


def _input_statements(cfg: JobConfig) -> list[dict[str, Any]]:
    """Read the input: its object; a glob's or a prefix's objects and the listing of that prefix; a list's objects
    and the list itself."""
    inp = cfg.input
    names = ([inp.uri] if inp.uri else []) + (inp.files if isinstance(inp.files, list) else
                                              [inp.files] if inp.files else [])
    out: list[dict[str, Any]] = []
    objects = []
    for name in names:
        if not name.startswith("s3://"):
            continue
        bucket, key = _split_s3(name)
        if inp.uri == name and inp.many:  # a glob or a prefix: everything under the part before the pattern
            prefix = key[:min((key.index(c) for c in "*?[" if c in key), default=len(key))]
            objects.append(f"arn:aws:s3:::{bucket}/{prefix}*")
            out.append({"Sid": "ListInput", "Effect": "Allow", "Action": ["s3:ListBucket"],
                        "Resource": [f"arn:aws:s3:::{bucket}"],
                        "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}}})
        else:
            objects.append(f"arn:aws:s3:::{bucket}/{key}")
    if isinstance(inp.files, str) and inp.files.startswith("s3://"):  # a list file's entries are read too
        bucket, key = _split_s3(inp.files)
        objects.append(f"arn:aws:s3:::{bucket}/{key.rsplit('/', 1)[0]}/*")
    if objects:
        out.insert(0, {"Sid": "ReadInput", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": objects})
    return out


def policy_for(cfg: JobConfig, *, account: str = "*", region: str | None = None,
               create_table: bool = False) -> dict[str, Any]:
    """The IAM policy document (``Version`` 2012-10-17) one job needs; no statement for local backends."""
    statements: list[dict[str, Any]] = []
    dynamodb = bool(cfg.rate_limits) and cfg.rate_limiter.kind == "dynamodb"
    if cfg.storage.uri.startswith("s3://"):
        bucket, prefix = _split_s3(cfg.storage.uri)
        paths = [f"jobs/{cfg.job_id}/", "_probes/"] + (["rate-limits/"] if dynamodb else [])
        statements.append({"Sid": "JobObjects", "Effect": "Allow", "Action": S3_OBJECT_ACTIONS,
                           "Resource": [f"arn:aws:s3:::{bucket}/{_under(prefix, p)}*" for p in paths]})
        statements.append({"Sid": "ListJobPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"],
                           "Resource": [f"arn:aws:s3:::{bucket}"],
                           "Condition": {"StringLike": {"s3:prefix": [f"{_under(prefix, p)}*" for p in paths]}}})
    statements += _input_statements(cfg)
    if dynamodb:
        from slurmctl.books.limits import limit_key

        where = region or cfg.rate_limiter.region or "*"
        table = f"arn:aws:dynamodb:{where}:{account}:table/{cfg.rate_limiter.table}"
        statements.append({"Sid": "RateLimitItems", "Effect": "Allow", "Action": DYNAMODB_ITEM_ACTIONS,
                           "Resource": [table],
                           "Condition": {"ForAllValues:StringEquals": {
                               "dynamodb:LeadingKeys": sorted(limit_key(cfg, n) for n in cfg.rate_limits)}}})
        statements.append({"Sid": "RateLimitTable", "Effect": "Allow",
                           "Action": ["dynamodb:DescribeTable"] + (["dynamodb:CreateTable"] if create_table else []),
                           "Resource": [table]})
    if cfg.storage.sse_kms_key_id:
        statements.append(_kms_statement(cfg.storage.sse_kms_key_id, account, region or cfg.storage.region or "*"))
    return {"Version": "2012-10-17", "Statement": statements}
