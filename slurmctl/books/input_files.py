"""An input of many files: a glob, a folder or S3 prefix, or a list (``input.files``), listed once into the job's books.

Real backfills arrive as a day's prefix of ``part-*.jsonl.gz`` or a Parquet dataset folder. Partitioning lists the
files once, in a fixed order (a list's own; a glob's or a folder's sorted by name), with each file's size and
identity (S3 ETag and size, or mtime and size), and writes that list beside the plan (``input/files.jsonl``). Each
file is cut into its own batches (a batch never spans files; a huge file is many byte ranges, small files are many
small batches that shards take many at a time), numbered on across files, and every item's line is job-wide (a
file's lines follow the previous file's), so the books' per-line identity holds across files; rejects and failures
name the file and its own line.

A resume never lists again to decide what to run: it compares a fresh listing with the recorded one and refuses to
go on (``InputChanged``, naming the files) if a file was added, removed or changed since partition.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slurmctl.books.manifests import Keys
from slurmctl.config import InputConfig, has_glob, suffixes_of
from slurmctl.storage import Store


class InputChanged(RuntimeError):
    """The input is not what was partitioned: a slice's bytes differ, or a file was added, removed or changed."""


class NoInputFiles(ValueError):
    """A glob, folder, prefix or list that names no file."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    size: int
    identity: str  # as ``Store.input_identity`` writes it


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _wanted(name: str, fmt: str) -> bool:
    """A folder's or prefix's file of the input's format, compressed or not."""
    return suffixes_of(name)[0] == fmt


def list_input(store: Store, inp: InputConfig) -> list[InputFile]:
    """The input's files, in the job's order, with their sizes and identities. Raises ``NoInputFiles``."""
    if inp.files is not None:
        names = inp.files if isinstance(inp.files, list) else _read_list(store, inp.files)
        files = [_identify(store, name) for name in names]
    elif inp.uri.startswith("s3://"):
        files = _list_s3(store, inp)
    else:
        files = _list_local(inp)
    if not files:
        raise NoInputFiles(f"input {inp.describe()} names no {inp.format} file")
    return files


def _read_list(store: Store, uri: str) -> list[str]:
    """A list file: one path or URI per line; blank lines and ``#`` comments skipped; relative ones against its
    folder (an S3 list's: its prefix)."""
    with store.open_uri(uri) as f:
        text = f.read().decode("utf-8")
    base = uri.rsplit("/", 1)[0]
    names = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name if "://" in name or name.startswith("/") else f"{base}/{name}")
    return names


def _identify(store: Store, uri: str) -> InputFile:
    identity = store.input_identity(uri)
    return InputFile(uri, int(identity.rsplit("size=", 1)[1]), identity)


def _list_local(inp: InputConfig) -> list[InputFile]:
    pattern = _local(inp.uri)
    if has_glob(pattern):
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    else:
        paths = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and _wanted(p.name, inp.format or ""))
    out = []
    for p in paths:
        st = os.stat(p)
        out.append(InputFile(p, st.st_size, f"file:mtime_ns={st.st_mtime_ns}:size={st.st_size}"))
    return out


def _list_s3(store: Store, inp: InputConfig) -> list[InputFile]:
    bucket, _, key = inp.uri[5:].partition("/")
    glob_at = min((key.index(c) for c in "*?[" if c in key), default=None)
    prefix = key if glob_at is None else key[:glob_at]
    out = []
    for page in store._s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"]
            if name.endswith("/"):
                continue
            if glob_at is not None and not fnmatch.fnmatchcase(name, key):
                continue
            if glob_at is None and not _wanted(name, inp.format or ""):
                continue
            etag = obj["ETag"].strip('"')
            out.append(InputFile(f"s3://{bucket}/{name}", int(obj["Size"]), f"s3:etag={etag}:size={obj['Size']}"))
    return sorted(out, key=lambda f: f.uri)


def record(store: Store, job_id: str, files: list[InputFile]) -> None:
    """The listing partition used, beside the plan."""
    store.put_bytes(Keys(job_id).input_files, b"".join(json.dumps(asdict(f)).encode() + b"\n" for f in files))


def recorded(store: Store, job_id: str) -> list[InputFile] | None:
    data = store.get_bytes(Keys(job_id).input_files)
    if data is None:
        return None
    return [InputFile(**json.loads(line)) for line in data.splitlines() if line.strip()]


def check_unchanged(store: Store, job_id: str, inp: InputConfig) -> None:
    """Before a resume runs more batches: the input's files are still those partitioned, or ``InputChanged``."""
    before = recorded(store, job_id)
    if before is None:
        return
    try:
        now = list_input(store, inp)
    except NoInputFiles:
        now = []
    was, is_ = {f.uri: f for f in before}, {f.uri: f for f in now}
    added = sorted(set(is_) - set(was))
    removed = sorted(set(was) - set(is_))
    changed = sorted(u for u in set(was) & set(is_) if was[u].identity != is_[u].identity)
    if added or removed or changed:
        parts = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
        raise InputChanged(f"the input's files are not those partitioned ({'; '.join(parts)}); the job reads the "
                           f"files it listed, so submit the new set as a new job")


def describe_line(spec_file: str, line: int, line_base: int) -> dict[str, Any]:
    """What a reject or a failure says of where its record is, in an input of many files."""
    return {"file": spec_file, "file_line": line - line_base}

