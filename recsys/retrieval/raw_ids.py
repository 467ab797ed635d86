"""Raw ids a user hands us (a --users or --history-file column, a DataFrame of users): every row has one,
or the read stops with one line naming the file and row.

A null or empty id is never dropped, and never becomes the text "None" (an unknown user that would
silently get the popularity fallback). Ids are text: an integer column is read as its digits, a
floating-point column is refused (7.0 would never match the id 7).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

#: What to do about a bad row, shared by every message.
_FIX = "give every row an id or remove the row"


def raw_id(value: Any) -> str | None:
    """`value` as a raw id (text or an integer's digits), or None when it is no id (null, NaN, blank
    text, a float, a bool, anything else)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(value)
    return None


def why_not(value: Any) -> str:
    """Why `raw_id(value)` refused it, in a few words."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, str):
        return "empty" if not value else "blank"
    return f"{value!r} (a {type(value).__name__}), not a text or integer id"


def checked_ids(values: Iterable[Any], where: str, what: str) -> list[str]:
    """`values` as raw ids; the first one that is no id → UserError `WHERE: row N: WHAT is null …`
    (rows count from 1, the first data row)."""
    out = []
    for n, value in enumerate(values, 1):
        rid = raw_id(value)
        if rid is None:
            raise UserError(f"{where}: row {n}: {what} is {why_not(value)}; {_FIX}")
        out.append(rid)
    return out


def id_column(table: pa.Table, column: str, where: str) -> list[str]:
    """Column `column` of `table` as raw ids (see `checked_ids`); a column of another type than text or
    integers → UserError naming it."""
    import pyarrow as pa

    col = table.column(column)
    kind = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    if not (text or pa.types.is_integer(kind)):
        raise UserError(f"{where}: column '{column}' holds {col.type} values; write ids as text or integers")
    return checked_ids(col.to_pylist(), where, column)
