"""Whole-file writes that readers never see half done: write a temporary file beside the
target, then rename it over the target (``os.replace`` is atomic on one file system)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path | str, text: str, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``text`` (making its folder); ``fsync``: the file flushed to
    disk before the rename and the folder after it, so a crash or power cut leaves the old
    file or the new one (state files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A new file of our own (O_EXCL) with the usual permissions (0666 less the umask;
    # tempfile.mkstemp would make it 0600, unreadable to other users of a report).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)  # the rename itself survives a power cut


def fsync_dir(folder: Path | str) -> None:
    """Flush ``folder``'s entries (a rename or a new file in it) to disk; raises OSError
    where the OS or file system refuses."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path | str, doc: Any, *, fsync: bool = False) -> None:
    """:func:`write_text_atomic` of ``doc`` as indented JSON with a final newline."""
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n", fsync=fsync)
