"""Reading the document a command runs on: a UTF-8 text file, or stdin for ``-``; one policy for every
command (``pbs prefill``, ``eval``, ``calibrate``, ``viz-mask``, ``profile --doc``)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UsageError


def read_document(doc: str) -> tuple[str, str]:
    """Read DOC ('-' = stdin) as UTF-8 text. Returns (text, display name). Raises UsageError on bad input."""
    if doc == "-":
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
        name = "<stdin>"
    else:
        path = Path(doc).expanduser()
        try:
            path.exists()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise UsageError(f"document {doc[:80]!r} cannot be used: {exc.strerror or exc}") from None
        if not path.exists():
            raise UsageError(f"document {doc!r} does not exist; pass a text file, or - to read stdin")
        if path.is_dir():
            raise UsageError(f"document {doc!r} is a directory; pass a text file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read document {doc!r}: {exc.strerror or exc}") from None
        name = str(path)
    if not data:
        raise UsageError(f"document {name!r} is empty; pass a text file with content")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UsageError(f"document {name!r} looks binary (NUL byte at offset {nul}); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"document {name!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise UsageError(f"document {name!r} holds only whitespace; pass a text file with content")
    return text, name
