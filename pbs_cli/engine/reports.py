"""Result records: a versioned envelope, the environment block, atomic writes.

Every saved result is a JSON object with ``schema_version``, ``command``, ``argv``, ``timestamp``,
``env`` and the command's own fields. Writers never leave a half-written file: they write a
temporary file in the target directory and rename it into place.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UsageError

SCHEMA_VERSION = 1


def environment() -> dict[str, Any]:
    """Versions and the accelerator, for the `env` block of every report. No secrets, no paths."""
    from importlib import metadata

    import torch

    def version(package: str) -> str | None:  # read from metadata: importing transformers/triton costs seconds
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    triton_version = version("triton")
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return {
        "pbs": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": version("transformers"),
        "gpu": gpu,
        "cpu_threads": torch.get_num_threads(),
    }


def envelope(command: str, **fields: Any) -> dict[str, Any]:
    """A report record: schema version, command and arguments, timestamp, environment, then ``fields``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "argv": sys.argv[1:],
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": environment(),
        **fields,
    }


def check_output_path(path: Path, force: bool) -> Path:
    """Refuse before any work starts: a missing directory, a directory, or an existing file without --force."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output path {str(path)!r} is a directory; give a file name")
    if not path.parent.exists():
        raise UsageError(f"output directory {str(path.parent)!r} does not exist; create it first")
    if path.exists() and not force:
        raise UsageError(f"{str(path)!r} exists; pass --force to overwrite it")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"output directory {str(path.parent)!r} is not writable")
    return path


def new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file (0o666 less the umask). Temporary files
    from ``mkstemp`` start at 0o600; writers set this before renaming them into place."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same directory and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(record: Any) -> str:
    return json.dumps(record, indent=2, default=str) + "\n"
