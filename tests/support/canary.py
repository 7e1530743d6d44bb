"""Looking for a secret everywhere a job could have written it: files, S3 objects, Slurm job scripts, the Prefect API.

Each function returns where a canary was found (``[]``: nowhere), so a test asserts ``== []`` and a failure lists
the places:

    canaries = ["canary-A-...", "canary-B-..."]
    assert hits_in_files(tmp_path, canaries) == []
    assert hits_in_prefect(prefect_api, canaries, since=started) == []
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Iterable

import httpx


def hits(label: str, body: bytes | str, canaries: Iterable[str]) -> list[str]:
    data = body.encode() if isinstance(body, str) else body
    return [f"{c} in {label}" for c in canaries if c.encode() in data]


def hits_in_files(root: Path, canaries: Iterable[str]) -> list[str]:
    """Every regular file under ``root`` (logs, manifests, outputs, captured job scripts)."""
    canaries = list(canaries)
    return [h for p in sorted(root.rglob("*")) if p.is_file() for h in hits(str(p), p.read_bytes(), canaries)]


def hits_in_bucket(s3: object, bucket: str, canaries: Iterable[str]) -> list[str]:
    """Every object in ``bucket`` (a boto3 S3 client that may read it)."""
    canaries, out = list(canaries), []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):  # type: ignore[attr-defined]
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()  # type: ignore[attr-defined]
            out += hits(f"s3://{bucket}/{obj['Key']}", body, canaries)
    return out


def capture_batch_scripts(job_name: str, into: Path) -> list[Path]:
    """``scontrol write batch_script`` of every Slurm job named ``job_name`` still known to Slurm (pending or
    running): the script exactly as slurmctld stores it, readable by whoever may read the job."""
    ids = subprocess.run(["squeue", "-h", "--name", job_name, "-o", "%i"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for job_id in ids:
        path = into / f"batch_script-{job_id}.sh"
        done = subprocess.run(["scontrol", "write", "batch_script", job_id, str(path)], capture_output=True,
                              text=True, timeout=30)
        if done.returncode == 0 and path.exists():
            paths.append(path)
    return paths


def _paged(client: httpx.Client, path: str, body: dict) -> list[str]:
    pages, offset = [], 0
    while True:
        response = client.post(path, json={**body, "limit": 200, "offset": offset})
        response.raise_for_status()
        pages.append(response.text)
        offset += len(response.json())
        if len(response.json()) < 200:
            return pages


def hits_in_prefect(api_url: str, canaries: Iterable[str], since: dt.datetime) -> list[str]:
    """The Prefect API's records, as it serves them: every flow run (name, parameters, state messages), every log
    line since ``since``, every artifact, and every event since ``since``."""
    canaries, out = list(canaries), []
    iso = since.astimezone(dt.timezone.utc).isoformat()
    with httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=60) as client:
        for text in _paged(client, "flow_runs/filter", {}):
            out += hits("Prefect flow runs", text, canaries)
        for text in _paged(client, "logs/filter", {"logs": {"timestamp": {"after_": iso}}}):
            out += hits("Prefect logs", text, canaries)
        for text in _paged(client, "artifacts/filter", {}):
            out += hits("Prefect artifacts", text, canaries)
        response = client.post("events/filter", json={"filter": {"occurred": {"since": iso}}, "limit": 50})
        while True:
            response.raise_for_status()
            out += hits("Prefect events", response.text, canaries)
            next_page = response.json().get("next_page")
            if not next_page:
                break
            response = client.get(next_page)
    return out
