"""RecBole atomic files: `.inter` interactions with `.user` / `.item` fields joined as side features."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from recsys.data.readers.delimited import FLOAT, STR, read_delimited
from recsys.data.readers.files import _first_line, check_file
from recsys.data.readers.side import (
    SideTable,
    _no_repeats,
    _side,
    _unique_ids,
    join_side,
    quantile_tokens,
    split_tokens,
    token_slots,
)
from recsys.data.readers.table import Table, _interactions, _strings
from recsys.errors import DataError, UserError

log = logging.getLogger(__name__)


RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


def recbole_fields(path: Path) -> dict[str, tuple[str, str]]:
    """Field name → (header column, type) of a RecBole atomic file's `name:type` header."""
    out: dict[str, tuple[str, str]] = {}
    for col in _first_line(path, "utf-8").split("\t"):
        name, sep, typ = col.rpartition(":")
        if not (sep and name and typ in RECBOLE_TYPES):
            raise DataError(
                f"{path}:1: header field {col!r} is not name:type with type one of "
                f"{', '.join(RECBOLE_TYPES)} (a RecBole atomic file starts with such a header)"
            )
        if name in out:
            raise DataError(f"{path}:1: field {name!r} appears twice in the header")
        out[name] = (col, typ)
    return out


def read_recbole(src: Any, skip_bad_rows: bool) -> Table:
    """RecBole atomic files (config kind `recbole`): the .inter interactions, with the .user and .item
    fields joined by id as side features (token → one feature; token_seq → `<name>_0 …` slots;
    float → quantile-bucket tokens; float_seq is refused)."""
    p = check_file(src.inter)
    fields = recbole_fields(p)
    wanted = {
        "user_id_field": src.user_id_field,
        "item_id_field": src.item_id_field,
        "rating_field": src.rating_field,
        "time_field": src.time_field,
    }
    for opt, name in wanted.items():
        if name is not None and name not in fields:
            raise DataError(f"{p}:1: no field {name!r} (data.source.{opt}); fields present: {list(fields)}")
    uid, iid, rating, ts = (fields[n][0] if n is not None else None for n in wanted.values())
    cols = [c for c in (uid, iid, rating, ts) if c is not None]
    types = {c: STR if c in (uid, iid) else FLOAT for c in cols}
    tbl, bad = read_delimited(
        p,
        delimiter="\t",
        columns=cols,
        types=types,
        header=True,
        required=cols,
        quoting=False,
        skip_bad_rows=skip_bad_rows,
    )
    unused = [f for f, (c, _) in fields.items() if c not in cols]
    if unused:
        log.info("%s: fields not used: %s", p, unused)
    names = tuple(src.rename.get(f, f) for f in (src.user_id_field, src.item_id_field))
    table = _interactions(p, tbl, bad, uid, iid, rating, ts, names=names)  # type: ignore[arg-type]
    known = set(fields)
    for what, side_path, name in (("user", src.user, names[0]), ("item", src.item, names[1])):
        if side_path is not None:
            side, side_fields = read_recbole_side(side_path, what, src, skip_bad_rows)
            known |= side_fields
            join_side(table, side, name, p)
    unknown = sorted(set(src.rename) - known)
    if unknown:
        raise UserError(
            f"data.source.rename: {unknown[0]!r} is not a field of the source files ({sorted(known)})"
        )
    return table


def read_recbole_side(
    path: str | Path, what: str, src: Any, skip_bad_rows: bool
) -> tuple[SideTable, set[str]]:
    """One .user or .item file as a SideTable of the chosen fields; also returns the file's field names."""
    p = check_file(path)
    fields = recbole_fields(p)
    id_field = getattr(src, f"{what}_id_field")
    if id_field not in fields:
        raise DataError(
            f"{p}:1: no field {id_field!r} (data.source.{what}_id_field); fields present: {list(fields)}"
        )
    chosen = getattr(src, f"{what}_features")
    chosen = [f for f in fields if f != id_field] if chosen is None else chosen
    for f in chosen:
        if f not in fields or f == id_field:
            raise UserError(
                f"data.source.{what}_features: {f!r} is not a feature field of {p} (fields: {list(fields)})"
            )
        if fields[f][1] == "float_seq":
            raise UserError(
                f"data.source.{what}_features: {f!r} is float_seq in {p}, which has no embedding here; leave it out"
            )
    id_col = fields[id_field][0]
    cols = [id_col, *(fields[f][0] for f in chosen)]
    tbl, bad = read_delimited(
        p,
        delimiter="\t",
        columns=cols,
        types={c: FLOAT if c.endswith(":float") else STR for c in cols},
        header=True,
        required=[id_col],
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        row_check=_no_repeats(id_col, what),
        table_check=_unique_ids(id_col),
    )
    features, notes = _recbole_features(p, what, tbl, {f: fields[f] for f in chosen}, src)
    return _side(what, p, tbl, bad, id_col, features, notes), set(fields)


def _recbole_features(
    p: Path, what: str, tbl: pa.Table, chosen: dict[str, tuple[str, str]], src: Any
) -> tuple[dict[str, pa.Array], list[str]]:
    """Features of the chosen fields by type: token → itself, float → quantile-bucket tokens,
    token_seq → `<name>_0 …` slots (with a note when tokens are dropped)."""
    features: dict[str, pa.Array] = {}
    notes = []
    for f, (col, typ) in chosen.items():
        name = src.rename.get(f, f)
        if typ == "token":
            features[name] = _strings(tbl.column(col)).combine_chunks()
        elif typ == "float":
            features[name] = quantile_tokens(tbl.column(col), src.float_buckets)
        else:
            k = src.seq_slots
            flat, parents = split_tokens(tbl.column(col), src.seq_separator)
            slots, over = token_slots(flat, parents, tbl.num_rows, [f"{name}_{j}" for j in range(k)])
            features.update(slots)
            if over:
                notes.append(
                    f"{p}: {over:,} {what}s have more than {k} {f!r} tokens; tokens after the first {k} "
                    "are dropped (data.source.seq_slots)"
                )
    return features, notes
