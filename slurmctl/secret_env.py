"""Secret environment variables for Slurm worker jobs, kept out of the job script.

sbatch keeps a job's script (``scontrol write batch_script`` prints it, to anyone who may read the job) and
dask-jobqueue logs it at debug level, so a secret written into it leaks. Workers still need some secrets (AWS keys,
``PREFECT_API_KEY``) where a site runs ``--export=NONE``. So the coordinator writes them to a file only the user can
read (mode 0600, in a 0700 directory under ``$SLURMCTL_HOME/secrets``, on the filesystem the nodes share, like the
logs), the job script sources that file by path, and the file is removed when the cluster closes.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Iterable, Mapping

# A forwarded variable whose name says it holds a credential. AWS_ACCESS_KEY_ID is not secret on its own, but it
# names the key pair: it goes with its secret.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)


def is_secret(name: str) -> bool:
    """Whether the variable ``name`` must never be written into a job script (or anywhere but the secrets file)."""
    return bool(SECRET_NAME.search(name))


def split_env(names: Iterable[str], env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Of ``names`` set in ``env``: the non-secret ones with their values (fine inline), and the secret names."""
    present = [n for n in names if n in env]
    return {n: env[n] for n in present if not is_secret(n)}, [n for n in present if is_secret(n)]


def write_env_file(path: Path, env: Mapping[str, str]) -> Path:
    """Write ``env`` as ``NAME='value'`` lines to ``path``, readable by the user only (0600, directory 0700).

    The file is created 0600 before a byte is written, and replaced atomically, so no other user ever sees a
    readable version of it, and a worker job starting meanwhile reads the old file or the new one, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left over from a crash
        os.write(fd, "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def remove_env_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def source_lines(path: Path) -> list[str]:
    """Job script lines that export the file's variables, or stop the job saying why (the cluster that wrote it
    has closed: a worker starting now would find no scheduler anyway)."""
    p = shlex.quote(str(path))
    return [f"if [ -r {p} ]; then set -a; . {p}; set +a; else echo \"slurmctl: secrets file {p} is gone (its job's "
            f"cluster has closed); this worker job exits\" >&2; exit 1; fi"]
