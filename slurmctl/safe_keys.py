"""Store keys built from user input (job ids, batch ids, rate-limit names and ``key:``) stay inside their prefix.

Two layers, so a mistake in one is caught by the other:

* ``name_problem`` / ``path_problem`` judge what a user typed (a config field, a CLI argument) and say what is wrong
  in words a config error can show next to the field (``rate_limits.api.key: must not contain '..'``).
* ``safe_key`` is called by every read and write of a manifest store (``slurmctl/storage/``): it refuses a
  key that could leave the store's root whatever built it: a ``..`` or ``.`` part, a leading ``/``, a backslash,
  NUL or another control character, a key over 1,024 bytes (S3's limit) or a part over 255 bytes (a filesystem's
  name limit), and the same tricks hidden in URL encoding (``..%2F``, ``%2e%2e/``, ``%5C``).

A store key may legitimately hold an encoded separator: the hive layout of a partitioned output writes a column
value ``a/b`` as the directory ``col=a%2Fb``. So the store layer decodes the key and refuses it only when the decoded
form escapes; a *name* from user input may not hold an encoded separator at all.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

#: S3's limit on a key's UTF-8 length; the S3 store checks its prefix and the key together.
MAX_KEY_BYTES = 1024
#: NAME_MAX of Linux filesystems: a local store cannot create a longer file or directory name.
MAX_PART_BYTES = 255
#: Names (job ids, batch ids, limit names) at most this long: a key is built from several of them.
MAX_NAME_BYTES = 128

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|2e|00)", re.IGNORECASE)


class UnsafeKey(ValueError):
    """A store key (or a name it is built from) that could leave the store's root or the job's prefix."""


def _raw_problem(key: str) -> str | None:
    """What makes ``key`` (as written, no decoding) unsafe as a path under a root, or None."""
    if "\x00" in key:
        return "must not contain a NUL character"
    if _CONTROL.search(key):
        return "must not contain control characters (newline, tab, ...)"
    if "\\" in key:
        return "must not contain a backslash ('\\')"
    if key.startswith("/"):
        return "must be relative (no leading '/')"
    parts = key.split("/")
    if ".." in parts:
        return "must not contain '..'"
    if "." in parts:
        return "must not contain '.' as a path part"
    return None


def key_problem(key: str) -> str | None:
    """What makes ``key`` unsafe as a store key (relative to the store's root), or None when it is safe.

    The empty key (the root itself) and keys ending in ``/`` (prefixes) are fine.
    """
    problem = _raw_problem(key)
    if problem:
        return problem
    size = len(key.encode())
    if size > MAX_KEY_BYTES:
        return f"must be at most {MAX_KEY_BYTES} bytes long (it is {size})"
    long_part = next((p for p in key.split("/") if len(p.encode()) > MAX_PART_BYTES), None)
    if long_part is not None:
        return f"each part between '/' must be at most {MAX_PART_BYTES} bytes long ({long_part[:20]}... is " \
               f"{len(long_part.encode())})"
    if "%" in key:
        decoded = unquote(key)
        hidden = _raw_problem(decoded) if decoded != key else None
        if hidden:
            return f"must not hide a path in URL encoding (%2F, %5C, %2E): decoded, it {hidden}"
    return None


def name_problem(name: str) -> str | None:
    """What makes ``name`` unsafe as one part of a key (a job id, batch id or limit name), or None."""
    if not name:
        return "must not be empty"
    problem = _raw_problem(name)
    if problem:
        return problem
    if "/" in name:
        return "must not contain '/'"
    if _ENCODED_SEPARATOR.search(name):
        return "must not contain URL-encoded separators or dots (%2F, %5C, %2E, %00)"
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes long (it is {size})"
    return None


def path_problem(path: str) -> str | None:
    """What makes ``path`` unsafe as a relative key of '/'-separated names (a rate limit's ``key:``), or None."""
    if not path:
        return "must not be empty"
    if path.startswith("/"):
        return "must be relative (no leading '/')"
    if path.endswith("/") or "//" in path:
        return "must not have an empty part ('//' or a trailing '/')"
    for part in path.split("/"):
        problem = name_problem(part)
        if problem:
            return problem
    size = len(path.encode())
    if size > MAX_KEY_BYTES // 4:
        return f"must be at most {MAX_KEY_BYTES // 4} bytes long (it is {size})"
    return None


def safe_key(key: str, where: str = "") -> str:
    """``key`` unchanged when it is safe under a store root; else ``UnsafeKey`` saying why and what to do."""
    problem = key_problem(key)
    if problem:
        raise UnsafeKey(f"refusing store key {key[:200]!r}{' in ' + where if where else ''}: {problem}; keys are "
                        f"built from job ids, batch ids and rate-limit keys, so check those for '..', '/', '\\' "
                        f"or URL encoding")
    return key


def check_name(name: str, what: str) -> str:
    """``name`` unchanged when it is safe as one key part; else ``UnsafeKey`` naming ``what`` it is."""
    problem = name_problem(name)
    if problem:
        raise UnsafeKey(f"{what} {name[:200]!r} {problem}")
    return name
