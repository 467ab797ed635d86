"""The raw files readers open: existence checks, sha256 (in the background), first line and header."""

from __future__ import annotations

import csv
import hashlib
import io
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from recsys.data.metadata import BadRows, SourceFile
from recsys.errors import DataError, UserError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:  # one reused 256 KiB buffer, not a new 4 MiB bytes per read
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_file(path: str | Path) -> Path:
    """The path, if it is a non-empty file; otherwise a one-line error."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found (check data.source paths)")
    if not p.is_file():
        raise UserError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file")
    return p


def _first_line(p: Path, encoding: str = "latin-1") -> str:
    """The file's first line (latin-1, the default, decodes any bytes: enough to detect a format)."""
    with open(p, "rb") as f:
        return f.readline().decode(encoding, errors="replace").rstrip("\r\n")


def _header(path: Path, delimiter: str) -> list[str]:
    """Column names from the first line of a delimited file."""
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
    return next(csv.reader(io.StringIO(first), delimiter=delimiter), [])


def _hash_in_background(path: Path) -> Future[str]:
    """sha256 of a file in a thread (hashlib releases the GIL), overlapping the parse."""
    if not path.is_file():
        check_file(path)
    return _HASH_POOL.submit(sha256_file, path)


_HASH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")


def _source_file(path: Path, rows: int, bad: BadRows) -> SourceFile:
    return SourceFile(path=str(path), sha256=sha256_file(path), rows=rows, bad_rows=bad)
