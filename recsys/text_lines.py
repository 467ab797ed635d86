"""Lines of a user-written text file, split the way ids need: on "\n" only.

str.splitlines also splits on \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and \u2029, any of which may be part
of a raw id (or of a JSON string); one such id would silently become two.
"""

from __future__ import annotations

from pathlib import Path

from recsys.errors import UserError


def read_lines(path: str | Path, what: str) -> list[str]:
    """The file's lines split on "\n" only, one trailing "\r" removed from each (Windows files), and no
    empty last line after a final newline; `what` (e.g. "--users") names the file in the error line."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not UTF-8 at byte {e.start}; save it as UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]
